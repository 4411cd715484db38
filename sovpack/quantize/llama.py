"""llama.cpp's quantizer (llama_model_quantize through llama-cpp-python), run in a child process.

A ctypes call cannot be interrupted, so Ctrl-C would otherwise wait for the whole model, and
an abort inside llama.cpp would take sovpack down with it. The child reports llama.cpp's
per-tensor log lines (progress) and its own event lines on stdout; the parent turns them
into progress callbacks and, on failure, into llama.cpp's reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sovpack.common.files import DISK_FULL, FILE_TOO_LARGE, free_space
from sovpack.common.hashing import sha256_file
from sovpack.common.sizes import human_size
from sovpack.errors import Failure, Refused

_CHILD_MARK = "\x1esovpack-quantize "
_PROGRESS_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_IO_FAILURE = ("iostream error", "failed to open")  # how llama.cpp reports a failed read or write (no errno)


@dataclass(frozen=True)
class QuantizerRun:
    versions: dict  # llama_cpp_version, llama_cpp_commit, ggml_version, llama_cpp_python_version, llama_cpp_libraries
    options: dict  # the llama_model_quantize_params used


def run_llama_quantize(
    source: Path,
    output: Path,
    qtype: str,
    *,
    ftype: int,
    threads: int,
    allow_requantize: bool,
    on_tensor: Callable[[int, int], None] | None = None,
    name: str | None = None,
) -> QuantizerRun:
    """Run llama_model_quantize(source -> output) in a child process; raise with llama.cpp's reason on failure."""
    request = {
        "input": str(source),
        "output": str(output),
        "type": qtype,
        "ftype": ftype,
        "threads": threads,
        "allow_requantize": allow_requantize,
        "parent_pid": os.getpid(),
    }
    package_root = str(Path(__file__).resolve().parents[2])
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from sovpack.quantize.llama "
        "import _child_main; sys.exit(_child_main(sys.argv[2]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, package_root, json.dumps(request)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = _ChildLog(on_tensor)
    try:
        for raw in process.stdout:
            log.feed(raw.decode("utf-8", errors="replace"))
        process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        process.stdout.close()
    return log.outcome(process.returncode, output, qtype, name or str(source))


class _ChildLog:
    """Reads the child's output: llama.cpp's log (progress lines) and sovpack's own event lines."""

    def __init__(self, on_tensor: Callable[[int, int], None] | None):
        self.on_tensor = on_tensor
        self.events: dict[str, dict] = {}
        self.tail: list[str] = []

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        if line.startswith(_CHILD_MARK):
            event = json.loads(line[len(_CHILD_MARK) :])
            self.events[event["event"]] = event
            return
        if line.strip():
            self.tail = (self.tail + [line])[-20:]
        match = _PROGRESS_LINE.match(line)
        if match and self.on_tensor:
            self.on_tensor(int(match[1]), int(match[2]))

    def outcome(self, returncode: int, output: Path, qtype: str, name: str) -> QuantizerRun:
        if "error" in self.events:
            raise Failure(self.events["error"]["message"])
        done = self.events.get("done")
        if done is None or returncode != 0:
            cause = f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with status {returncode}"
            raise Failure(
                f"llama.cpp's quantizer {cause} while quantizing {name} to {qtype}; nothing was added to the bundle. "
                f"Its last output: {self._last_lines()}"
            )
        if done["rc"] != 0:
            raise self._failure(output, qtype, name)
        start = self.events["start"]
        return QuantizerRun({**start["versions"], "llama_cpp_libraries": library_digests(start["libraries"])}, start["options"])

    def _failure(self, output: Path, qtype: str, name: str) -> Exception:
        reason = next(
            (line.split("failed to quantize: ", 1)[1] for line in reversed(self.tail) if "failed to quantize: " in line),
            self._last_lines(),
        )
        if not any(hint in reason for hint in _IO_FAILURE):
            return Refused(f"llama.cpp refused to quantize {name} to {qtype}: {reason}; nothing was added to the bundle")
        write_error = _write_error(output)
        if write_error is not None:
            return Failure(_write_error_message(write_error, output, qtype, name))
        return Failure(f"llama.cpp could not read {name} or write its {qtype} output ({reason}); nothing was added to the bundle")

    def _last_lines(self) -> str:
        return " | ".join(self.tail[-3:]) or "(nothing)"


def _write_error(partial: Path) -> OSError | None:
    """Repeat the write llama.cpp failed, to learn the errno it does not report ("iostream error")."""
    if not partial.exists():
        return None
    try:
        with open(partial, "ab") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    return None


_library_digests: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> SHA-256


def library_digests(paths: list[str] | None) -> dict[str, str] | None:
    """SHA-256 of each shared library the child loaded, by file name; each file is hashed once per process."""
    if paths is None:
        return None
    digests = {}
    for path in map(Path, paths):
        try:
            st = path.stat()
        except OSError:
            continue  # replaced or deleted since it was loaded
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _library_digests:
            _library_digests[key] = sha256_file(path)
        digests[path.name] = _library_digests[key]
    return digests


def _write_error_message(error: OSError, output: Path, qtype: str, name: str) -> str:
    where = output.parent.parent
    if error.errno in DISK_FULL:
        return (
            f"the disk filled up while writing the {qtype} output of {name} ({error.strerror}; the filesystem holding {where} "
            f"has {human_size(free_space(output.parent))} free); nothing was added to the bundle: free some space, run again"
        )
    if error.errno == FILE_TOO_LARGE:
        return (
            f"the {qtype} output of {name} grew past a file-size limit ({error.strerror}: ulimit -f, or the largest file the "
            f"filesystem holding {where} can store); nothing was added to the bundle"
        )
    return f"writing the {qtype} output of {name} failed: {error.strerror}; nothing was added to the bundle"


# Everything below runs in the child process.

_log_callback = None  # kept alive for as long as llama.cpp may call it


def _child_main(request_json: str) -> int:
    request = json.loads(request_json)
    _exit_with_parent(request["parent_pid"])
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the C call at once
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        _emit(
            "error", message=f"cannot load llama-cpp-python ({e}); reinstall sovpack's llama extra: pip install 'sovpack[llama]'"
        )
        return 3
    qtype, ftype = request["type"], request["ftype"]
    if getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None) != ftype:
        _emit(
            "error",
            message=f"llama-cpp-python {llama_cpp.__version__} does not define {qtype} as llama_ftype {ftype}; "
            "this sovpack does not support that llama-cpp-python",
        )
        return 3
    params = llama_cpp.llama_model_quantize_default_params()
    defaults = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = ftype, request["threads"], request["allow_requantize"]
    global _log_callback
    _log_callback = llama_cpp.llama_log_callback(_forward_log)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    _emit("start", versions=_llama_versions(llama_cpp), libraries=_loaded_libraries(), options=_options(params, defaults))
    rc = llama_cpp.llama_model_quantize(os.fsencode(request["input"]), os.fsencode(request["output"]), ctypes.byref(params))
    _emit("done", rc=rc)
    return 0


def _forward_log(level: int, text: bytes | None, user_data) -> None:
    """llama.cpp's log, progress lines included, goes to the parent as it comes."""
    os.write(1, text or b"")


def _emit(event: str, **fields) -> None:
    os.write(1, ("\n" + _CHILD_MARK + json.dumps({"event": event, **fields}) + "\n").encode())


def _exit_with_parent(parent_pid: int) -> None:
    """Die with the parent (SIGKILL included), so a killed sovpack leaves no quantizer writing."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _options(params, defaults) -> dict:
    options = {
        name: getattr(params, name)
        for name in (
            "ftype",
            "nthread",
            "allow_requantize",
            "quantize_output_tensor",
            "only_copy",
            "pure",
            "keep_split",
            "output_tensor_type",
            "token_embedding_type",
        )
    }
    for name in ("output_tensor_type", "token_embedding_type"):
        if options[name] == getattr(defaults, name):
            options[name] = None  # llama.cpp's own choice for the ftype
    # sovpack never passes these: no importance matrix, no metadata, tensor-type or pruning overrides
    return options | {"imatrix": None, "kv_overrides": None, "tensor_type_overrides": None, "prune_layers": None}


def _llama_versions(llama_cpp) -> dict:
    try:
        from llama_cpp._ggml import libggml
    except (ImportError, OSError):
        libggml = None
    return {
        "llama_cpp_version": _c_text(llama_cpp, "llama_version"),
        "llama_cpp_commit": _c_text(libggml, "ggml_commit"),  # llama.cpp's build commit: llama.cpp builds ggml with it
        "ggml_version": _c_text(libggml, "ggml_version"),
        "llama_cpp_python_version": llama_cpp.__version__,
    }


def _c_text(library, function: str) -> str | None:
    """The string a C function `const char * f(void)` returns, or None where it does not exist."""
    try:
        func = getattr(library, function)
        if isinstance(func, ctypes._CFuncPtr):
            func.argtypes, func.restype = [], ctypes.c_char_p
        value = func()
    except (AttributeError, OSError, TypeError):
        return None
    return value.decode("utf-8", errors="replace") if value else None


def _loaded_libraries() -> list[str] | None:
    """Paths of the llama.cpp and ggml shared libraries this process really loaded (Linux); the parent hashes them."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return sorted(
        {
            line.split(None, 5)[5]
            for line in maps.splitlines()
            if len(line.split(None, 5)) == 6 and re.search(r"/lib(llama|ggml)[^/]*\.so", line)
        }
    )
