"""The sandbox actor, split by concern: ``actor`` (boot, mailbox, lifetime, the public
operations), ``dispatch`` (agent frames into execs and the event log), ``snapshot``,
``recovery`` (progress records and take-over), ``core`` (the state the parts share) and
``params`` (what a sandbox is made with)."""

from sandstorm.actors.sandbox.actor import SandboxActor
from sandstorm.actors.sandbox.params import ExecPlan, SandboxParams, StoredMount, StoredParams
from sandstorm.actors.sandbox.recovery import Recovered, load_recovered

__all__ = [
    "ExecPlan",
    "Recovered",
    "SandboxActor",
    "SandboxParams",
    "StoredMount",
    "StoredParams",
    "load_recovered",
]
