"""Every span, attribute and metric name that Tangram emits, in one place.

Why one module: dashboards, alerts and tests match on these strings, so a rename must be a
one-line change that every emitter picks up. Where the OpenTelemetry GenAI semantic
conventions define a name (LLM calls, tool execution, token usage) we use theirs verbatim;
`tests/test_semconv.py` checks them against the installed `opentelemetry-semantic-conventions`.
Tangram's own concepts (actions, pools, the scheduler, RL steps) live under ``tangram.*``.
"""

from __future__ import annotations

from typing import Final

# --- OpenTelemetry GenAI semantic conventions (incubating) ------------------------------------
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_SEED: Final = "gen_ai.request.seed"
GEN_AI_REQUEST_CHOICE_COUNT: Final = "gen_ai.request.choice.count"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID: Final = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE: Final = "gen_ai.tool.type"
ERROR_TYPE: Final = "error.type"

# gen_ai.operation.name values
OP_TEXT_COMPLETION: Final = "text_completion"
OP_CHAT: Final = "chat"
OP_EXECUTE_TOOL: Final = "execute_tool"
OP_INVOKE_AGENT: Final = "invoke_agent"

# gen_ai.provider.name for engines this project drives (not in the well-known list: custom value)
PROVIDER_VLLM: Final = "vllm"

# GenAI client metrics
METRIC_GEN_AI_TOKEN_USAGE: Final = "gen_ai.client.token.usage"
METRIC_GEN_AI_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"

# --- Tangram spans ---------------------------------------------------------------------------
SPAN_ACTION: Final = "tangram.action"
SPAN_SCHEDULER_PLAN: Final = "tangram.scheduler.plan"
SPAN_ROLLOUT: Final = "tangram.rollout"
SPAN_TRAIN_RUN: Final = "tangram.train.run"  # asynchronous mode: one timeline for the run
SPAN_TRAIN_STEP: Final = "tangram.train.step"
SPAN_TRAIN_REWARDS: Final = "tangram.train.rewards"  # all reward actions of a step
SPAN_TRAIN_REWARD: Final = "tangram.train.reward"  # one trajectory's reward components
SPAN_TRAIN_UPDATE: Final = "tangram.train.update"
SPAN_TRAIN_WEIGHT_SYNC: Final = "tangram.train.weight_sync"
SPAN_TRAIN_EVAL: Final = "tangram.train.eval"  # run.eval_every: pass@k on the rollout engine
SPAN_DEMO: Final = "tangram.demo"
SPAN_REWARD_SCORE: Final = "tangram.reward.score"
SPAN_SANDBOX_RUN: Final = "tangram.sandbox.run"
SPAN_SANDBOX_RUN_TESTS: Final = "tangram.sandbox.run_tests"

# Events on an action span: each start on a manager, each retry after its worker died, and a
# resize of a running action that its manager refused (its units stay fixed from then on).
EVENT_ACTION_START: Final = "tangram.action.start"
EVENT_ACTION_RETRY: Final = "tangram.action.retry"
EVENT_ACTION_RESIZE_REFUSED: Final = "tangram.action.resize_refused"

# --- Tangram attributes ----------------------------------------------------------------------
ACTION_ID: Final = "tangram.action.id"
ACTION_KIND: Final = "tangram.action.kind"
ACTION_STATUS: Final = "tangram.action.status"
ACTION_UNITS: Final = "tangram.action.units"
ACTION_RESIZE_TARGET: Final = "tangram.action.resize_target"  # units a refused resize asked for
ACTION_QUEUE_WAIT_S: Final = "tangram.action.queue_wait_s"
TRAJECTORY_ID: Final = "tangram.trajectory.id"
STEP_ID: Final = "tangram.step.id"
ROLLOUT_TURN: Final = "tangram.rollout.turn"
POLICY_VERSION: Final = "tangram.policy.version"
POLICY_STALENESS: Final = "tangram.policy.staleness"  # trained version minus oldest sampler's
POOL_NAME: Final = "tangram.pool.name"
REWARD: Final = "tangram.reward"
ACTION_ATTEMPTS: Final = "tangram.action.attempts"  # starts so far (retries after WorkerLost)
REWARD_DEPLOYMENT: Final = "tangram.reward.deployment"
REWARD_REPLICA: Final = "tangram.reward.replica"
REWARD_BATCH_SIZE: Final = "tangram.reward.batch_size"
REWARD_QUEUE_WAIT_S: Final = "tangram.reward.queue_wait_s"
REWARD_MODEL_VERSION: Final = "tangram.reward.model_version"
REWARD_REQUEST_ID: Final = "tangram.reward.request_id"
SANDBOX_LANGUAGE: Final = "tangram.sandbox.language"
SANDBOX_STATUS: Final = "tangram.sandbox.status"
SANDBOX_QUEUE_WAIT_S: Final = "tangram.sandbox.queue_wait_s"
SANDBOX_WALL_S: Final = "tangram.sandbox.wall_s"
SANDBOX_CPU_S: Final = "tangram.sandbox.cpu_s"
SANDBOX_TESTS: Final = "tangram.sandbox.tests"
SANDBOX_WORKERS: Final = "tangram.sandbox.workers"  # workers a test batch was spread over
SANDBOX_PASS_FRACTION: Final = "tangram.sandbox.pass_fraction"
SANDBOX_WORKER_PID: Final = "tangram.sandbox.worker.pid"

# --- Tangram metrics -------------------------------------------------------------------------
METRIC_ACTION_COMPLETION_TIME: Final = "tangram.action.completion_time"
METRIC_ACTION_QUEUE_WAIT: Final = "tangram.action.queue_wait"
METRIC_POOL_CAPACITY: Final = "tangram.pool.capacity"
METRIC_QUEUE_LENGTH: Final = "tangram.queue.length"
METRIC_RESOURCE_UTILISATION: Final = "tangram.resource.utilisation"
METRIC_SCALE_EVENTS: Final = "tangram.pool.scale_events"
#: Histogram buckets for action times: a sandbox run takes milliseconds, a reward-model batch
#: seconds, a cold start minutes. The SDK's default (0, 5, 10, ... 10000) would put them all in
#: the first bucket.
SECONDS_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip
RESOURCE_TYPE: Final = "tangram.resource.type"
ORCHESTRATOR: Final = "tangram.orchestrator"


def gen_ai_span_name(operation: str, target: str | None) -> str:
    """The span name the GenAI conventions ask for: ``"{operation} {model or tool}"``."""
    return f"{operation} {target}" if target else operation
