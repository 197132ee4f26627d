"""Files one compile leaves in a dump folder, also sent to ``torch._logging.trace_structured``.

    <root>/compile_<seq>_<frame>-<recompile>[_attempt<k>]_<pid>/
        inputs.json, inputs.txt          the input table (shape, stride, dtype, device, subclass,
                                         FP8 payload dtype, scale, convention, granularity)
        graph_dynamo.py                  the graph Dynamo captured, as readable code
        pass_1_lower.before.py / .after.py / .diff    the lowering pass, before, after, diff
        report.json, report.txt          sites, rejected candidates with reasons, near misses
        drawings.json                    the subgraph of every site and rejection (for the page)
        output_code_<i>.py               copies of the code Inductor generated (forward, backward)
    <root>/index.html                    rebuilt after every compile (artifacts/page.py)

With ``TORCH_TRACE`` set, tlparse shows the same texts as ``sparse_mla_*`` artifacts.
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import os
import shutil
import threading
from typing import Any, Optional

import torch

_SEQ = itertools.count()
_LOCK = threading.Lock()


def _trace(name: str, payload: str, encoding: str = "string") -> None:
    try:
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"sparse_mla_{name}", "encoding": encoding},
            payload_fn=lambda: payload,
        )
    except Exception:  # noqa: BLE001 - tracing is best effort; the files are the record
        pass


def readable(gm: torch.fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    except Exception:  # noqa: BLE001 - older print_readable signatures
        return gm.print_readable(print_output=False)


class CompileDump:
    """The folder of one compile (one frame, one recompile, one attempt)."""

    def __init__(self, root: str, compile_id: str, attempt: int) -> None:
        seq = next(_SEQ)
        suffix = f"_attempt{attempt}" if attempt else ""
        name = f"compile_{seq:03d}_{compile_id.replace('/', '-')}{suffix}_{os.getpid()}"
        self.root = root
        self.folder = os.path.join(root, name)
        os.makedirs(self.folder, exist_ok=True)
        self._outputs = 0

    def text(self, name: str, content: str) -> str:
        path = os.path.join(self.folder, name)
        with open(path, "w") as f:
            f.write(content)
        _trace(name.replace(".", "_"), content)
        return path

    def json(self, name: str, obj: Any) -> str:
        content = json.dumps(obj, indent=1, default=str)
        path = os.path.join(self.folder, name)
        with open(path, "w") as f:
            f.write(content)
        _trace(name.replace(".", "_"), content, "json")
        return path

    def pass_diff(self, index: int, name: str, before: str, after: str) -> None:
        stem = f"pass_{index}_{name}"
        self.text(f"{stem}.before.py", before)
        self.text(f"{stem}.after.py", after)
        diff = difflib.unified_diff(before.splitlines(True), after.splitlines(True), f"{stem}.before.py", f"{stem}.after.py")
        self.text(f"{stem}.diff", "".join(diff))

    def output_code(self, path: str) -> None:
        with _LOCK:
            self._outputs += 1
            target = os.path.join(self.folder, f"output_code_{self._outputs}.py")
        try:
            shutil.copyfile(path, target)
        except OSError:
            target = path
        with open(os.path.join(self.folder, "output_code.txt"), "a") as f:
            f.write(f"{path} -> {target}\n")


class OutputCodeCapture(logging.Handler):
    """Catches Inductor's "Output code written to: <path>" and files it under its compile id."""

    _installed: Optional["OutputCodeCapture"] = None

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_compile: dict[str, CompileDump] = {}

    @classmethod
    def install(cls) -> "OutputCodeCapture":
        if cls._installed is None:
            from torch._inductor.codecache import output_code_log

            handler = cls()
            output_code_log.addHandler(handler)
            if output_code_log.getEffectiveLevel() > logging.INFO:
                output_code_log.setLevel(logging.INFO)
            cls._installed = handler
        return cls._installed

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Output code written to" not in msg:
            return
        try:
            from torch._guards import CompileContext

            cid = CompileContext.current_compile_id()
        except Exception:  # noqa: BLE001
            cid = None
        dump = self.by_compile.get(str(cid))
        if dump is not None:
            dump.output_code(msg.split(": ", 1)[1].strip())
