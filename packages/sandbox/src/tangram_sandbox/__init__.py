"""Tangram sandbox: isolated, pre-warmed code-execution pools driven per action by tangram-core.

The pool, the isolation layers and `SandboxManager` arrive with the sandbox issue; importing this
package stays cheap so that tangram-core can list it without paying for it."""

__version__ = "0.1.0"

__all__ = ["__version__"]
