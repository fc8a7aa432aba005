"""Ray at the edge of core: pools of Ray actors (:mod:`.pool`) and the orchestrator as a Ray
actor that any process of a cluster can submit to (:mod:`.runtime`).

Why a subpackage: everything else in tangram-core runs without Ray (its ``[ray]`` extra is
optional); only code that imports from here needs it.
"""
