"""One exec as its sandbox actor follows it (an :class:`ExecTracker`): output caps, verdict,
result assembly. What the store keeps of an exec is a row (``sandstorm.store``), not this."""

from __future__ import annotations

import base64
import codecs
import time
from dataclasses import dataclass, field

import trio

from sandstorm.agent import ExitInfo, FrameKind
from sandstorm.api.timestamps import rfc3339
from sandstorm.api.types import ExecResult, ExecSummary, StderrEvent, StdoutEvent, Verdict


class OutputBuffer:
    """What a result keeps of one output stream: the first ``cap`` bytes, and the total seen."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.total = 0
        # Chunks can split a UTF-8 sequence; the decoder holds the partial tail for the stream.
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]

    def release(self) -> None:
        self.kept = bytearray()

    def restore(self, kept: bytes, total: int) -> None:
        """Pick up from a checkpoint (a gateway restart): what was kept, and the total seen."""
        self.kept = bytearray(kept[: self.cap])
        self.total = max(total, len(self.kept))

    @property
    def truncated(self) -> bool:
        return self.total > len(self.kept)

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")

    def stream_fields(self, chunk: bytes) -> dict[str, str]:
        """``data`` when the chunk continues valid UTF-8, else ``data_b64`` of the raw bytes."""
        try:
            return {"data": self._decoder.decode(chunk)}
        except UnicodeDecodeError:
            self._decoder.reset()
            return {"data_b64": base64.b64encode(chunk).decode()}


@dataclass(eq=False)
class ExecTracker:
    exec_id: str
    channel: int
    argv: list[str]
    timeout_s: float
    stdout: OutputBuffer
    stderr: OutputBuffer
    started_at: str = field(default_factory=rfc3339)
    started_mono: float = field(default_factory=time.monotonic)
    pid: int | None = None
    # Set by the gateway when it decides the outcome before the process ends.
    kill_verdict: Verdict | None = None
    result: ExecResult | None = None
    done: trio.Event = field(default_factory=trio.Event)
    stdin_closed: bool = False

    @property
    def running(self) -> bool:
        return self.result is None

    def output_event(self, kind: int, chunk: bytes, seq: int, ts: str) -> StdoutEvent | StderrEvent:
        if kind == FrameKind.STDOUT:
            return StdoutEvent(
                seq=seq, ts=ts, exec_id=self.exec_id, **self.stdout.stream_fields(chunk)
            )
        return StderrEvent(seq=seq, ts=ts, exec_id=self.exec_id, **self.stderr.stream_fields(chunk))

    def finish(self, info: ExitInfo | None, *, verdict: Verdict | None = None) -> ExecResult:
        """Assemble the result once; later calls return the first one."""
        if self.result is not None:
            return self.result
        if verdict is None:
            verdict = self.kill_verdict
        if verdict is None:
            if info is not None and info.signal is not None and info.oom_killed:
                # The kernel's OOM killer ended the process but the sandbox lives on (a VM's
                # guest kernel, a container's cgroup); a whole-sandbox OOM is the actor's path.
                verdict = "oom"
            elif info is None or info.signal is not None:
                verdict = "killed"
            else:
                verdict = "ok" if info.exit_code == 0 else "error"
        elapsed_ms = (time.monotonic() - self.started_mono) * 1000
        self.result = ExecResult(
            exec_id=self.exec_id,
            exit_code=info.exit_code if info else None,
            signal=info.signal if info else None,
            verdict=verdict,
            stdout=self.stdout.text(),
            stderr=self.stderr.text(),
            stdout_truncated=self.stdout.truncated,
            stderr_truncated=self.stderr.truncated,
            duration_ms=round(info.duration_ms if info else elapsed_ms, 3),
            cpu_time_ms=round(info.cpu_time_ms, 3) if info else 0.0,
            max_rss_bytes=info.max_rss_bytes if info else 0,
        )
        # The result holds the text now; the raw copies would only double the memory.
        self.stdout.release()
        self.stderr.release()
        self.done.set()
        return self.result

    def retained_bytes(self) -> int:
        if self.result is None:
            return len(self.stdout.kept) + len(self.stderr.kept)
        return len(self.result.stdout) + len(self.result.stderr)

    def summary(self) -> ExecSummary:
        return ExecSummary(
            exec_id=self.exec_id,
            state="running" if self.running else "finished",
            started_at=self.started_at,
            argv=self.argv,
            result=self.result,
        )
