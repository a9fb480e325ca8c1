"""Static instruction counts of fastlm's Triton kernels at GPT-2's real call shapes: a proxy, not a timing.

    python -m bench.static_counts [--arch 90|80] [--out FILE.md] [--json FILE.json] [--only REGEX]
    python -m bench.static_counts --write      # regenerate bench/results/static-counts-sm{80,90}-triton<version>.*

Needs no GPU (TRITON_INTERPRET must be unset; the tool re-executes itself without it). For each kernel launch that
GPT-2 really makes, it compiles the kernel ahead of time for sm_90 or sm_80 and reads the cubin with the cuobjdump
in Triton's wheel. Printed per kernel and configuration: registers, spills (stack bytes), shared memory,
occupancy, tile, warps, stages, grid, and SASS instructions in the main loop per unit of work.

Method
- Launches. The real launch code runs on meta tensors (no data, no GPU): each launched `@triton.jit` kernel in
  kernels/ is swapped for a recorder, the custom ops' fake (meta) implementations for their real ones, and the
  device checks are relaxed, so the launchers compute grids, strides, configs and flags exactly as on a GPU.
  Attention is GPT-2's own `CausalSelfAttention` from fastlm/model.py (q, k, v strided views of the fused
  (B, T, 3, H, D) projection; the output and dO laid out as the launcher makes them), run forward and backward
  at B=8, T=1024: D=64 (GPT-2, H=12, C=768) and D=128 (H=16, C=2048). Norms: 8192 rows x N in {768, 1024,
  1600, 4096}, bf16, forward and backward; and the fused residual add as GPT-2 runs it under bf16 autocast (a
  bf16 branch into an fp32 residual stream) where the kernel has it. Cross-entropy: 8192 rows, V=50257, bf16,
  standalone (row stride 50257) and inside the fused LM head (its own logits buffer, row stride padded to 50304).
- Specialisation. Each recorded argument list goes through Triton's own launcher binder
  (`create_function_from_signature` + `JITFunction._pack_args`, the code `kernel[grid](...)` runs), with tensors
  standing in by dtype and address (a 16-aligned base plus the view's byte offset). So pointers at 16-byte
  addresses and ints divisible by 16 get `tt.divisibility=16`, ints equal to 1 become the constant 1, other ints
  get nothing: the code a GPU would run for that call.
- The main loop. The SASS (`cuobjdump -sass`) is split at each backward branch: a branch whose target lies at or
  before it closes a loop spanning [target, branch]. Loops that contain no other loop are the candidates; the
  main loop is the one with the most tensor-core instructions (HGMMA/HMMA), and among equals the one with the
  fewest instructions: a kernel that runs the same tile loop unmasked and masked (the diagonal and ragged
  blocks) spends nearly all iterations in the unmasked copy. With no MMA the largest loop counts. A kernel
  without a loop (a single-pass norm forward, the cross-entropy backward) counts its whole body, once per program.
  The count is static (every instruction between the target and the branch, predicated-off ones included), per
  thread and per iteration; warp-instructions per unit = n x num_warps / (units of work in one iteration):
  attention per 1K scores (BLOCK_M x BLOCK_N scores per iteration), norms per row (BLOCK_M rows per program or
  iteration; per element = per row / N), cross-entropy per logit of the row (a block of BLOCK_V slots holds
  V / cdiv(V, BLOCK_V) real logits on average: with BLOCK_V = 4096 a V=50257 row takes 13 blocks).
- Occupancy: warps per SM that fit by registers (allocated per warp in units of 256), by shared memory (1 KB
  reserved per block; 228 KB per SM on sm_90, 164 KB on sm_80), by the 64-warp and 32-block limits.
- Reference: Triton's tutorial 06 fused attention, compiled the same way at its own configs for GPT-2's shapes
  (fp16, causal; host tensor descriptors on sm_90 as the tutorial passes them there), when a copy of
  python/tutorials/06-fused-attention.py is given (--tutorial or FASTLM_TUTORIAL06; it is not part of fastlm,
  and only its @triton.jit functions are loaded). Its published static counts (triton 3.6, sm_90) are 257 and
  246 warp-instructions per 1K scores forward at D=64 and D=128, 331 for its dK/dV loop at D=64.

tests/kernels/test_static_counts.py compares a fresh run with the committed table of the same Triton version.
"""
from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KERNEL_MODULES = ("kernels.flash_attention", "kernels.norms", "kernels.softmax_cross_entropy",
                  "kernels.fused_linear_cross_entropy")
TUTORIAL_ENV = "FASTLM_TUTORIAL06"

# Per SM: registers, shared memory (bytes), warps and blocks; 1 KB of shared memory is reserved per block.
ARCHS = {
    90: dict(gpu="H100/H200", sms=132, regs=65536, smem=228 * 1024, max_warps=64, max_blocks=32),
    80: dict(gpu="A100", sms=108, regs=65536, smem=164 * 1024, max_warps=64, max_blocks=32),
}
# Units of work in one main-loop iteration (or one program when the kernel has no loop), from the launch's constexprs
# and int arguments. Cross-entropy counts real logits: a row of V takes cdiv(V, BLOCK_V) blocks of BLOCK_V slots.
UNITS: dict[str, tuple[str, Callable[[dict], float]]] = {
    "_attn_fwd_kernel": ("1K scores", lambda c: c["BLOCK_M"] * c["BLOCK_N"] / 1024),
    "_attn_bwd_dkdv_kernel": ("1K scores", lambda c: c["BLOCK_M"] * c["BLOCK_N"] / 1024),
    "_attn_bwd_dq_kernel": ("1K scores", lambda c: c["BLOCK_M"] * c["BLOCK_N"] / 1024),
    "_attn_bwd_preprocess_kernel": ("row", lambda c: c["BLOCK_M"]),
    "_norm_fwd_kernel": ("row", lambda c: c["BLOCK_M"]),
    "_norm_bwd_kernel": ("row", lambda c: c["BLOCK_M"]),
    "_cross_entropy_fwd_kernel": ("logit", lambda c: c["V"] / -(-c["V"] // c["BLOCK_V"])),
    "_cross_entropy_bwd_kernel": ("logit", lambda c: c["V"] / -(-c["V"] // c["BLOCK_V"])),
    # tutorial 06
    "tutorial06 _attn_fwd": ("1K scores", lambda c: c["BLOCK_M"] * c["BLOCK_N"] / 1024),
    "tutorial06 _attn_bwd dK/dV": ("1K scores", lambda c: c["BLOCK_M1"] * c["BLOCK_N1"] / 1024),
    "tutorial06 _attn_bwd dQ": ("1K scores", lambda c: c["BLOCK_M2"] * c["BLOCK_N2"] / 1024),
}
# Published counts to compare with (shared/NOTES.md: triton 3.6, sm_90, bf16/fp16, GPT-2's causal call).
REFERENCE = {
    ("attention D=64", "_attn_fwd_kernel"): (257, "tutorial 06"),
    ("attention D=128", "_attn_fwd_kernel"): (246, "tutorial 06"),
    ("attention D=64", "_attn_bwd_dkdv_kernel"): (331, "tutorial 06"),
    ("attention D=64", "tutorial06 _attn_fwd"): (257, "published"),
    ("attention D=128", "tutorial06 _attn_fwd"): (246, "published"),
    ("attention D=64", "tutorial06 _attn_bwd dK/dV"): (331, "published"),
}
CE_REFERENCE = 1.43  # Liger-Kernel cross-entropy, warp-instructions per logit forward + backward


# -----------------------------------------------------------------------------------------------------------------
# Recording the launches GPT-2 makes, on meta tensors

@dataclasses.dataclass
class Launch:
    """One kernel launch: which kernel (module and name, or a file), its grid and its arguments, encoded so that
    they pickle (tensors as ("ptr", dtype, address)); `case` names the call it belongs to."""

    case: str
    kernel: tuple[str, str, str]  # ("module", module, name) or ("file", path, name)
    grid: tuple
    args: list
    kwargs: dict
    label: str = ""               # the kernel's row name (default: its function name)
    loop: str = "default"         # main-loop rule: "default" or "after-first" (the tutorial's fused dQ half)

    @property
    def name(self) -> str:
        return self.label or self.kernel[2]


_BASE_ADDRESS = 1 << 20  # any 256-aligned allocation: the caching allocator's are


def _encode(value):
    import torch

    if isinstance(value, torch.Tensor):
        return ("ptr", str(value.dtype).removeprefix("torch."), _BASE_ADDRESS + value.storage_offset() * value.element_size())
    if type(value).__name__ == "TensorDescriptor":
        return ("desc", _encode(value.base), list(value.shape), list(value.strides), list(value.block_shape))
    return value


class _Pointer:
    """Stands in for a tensor argument in Triton's binder: it reads only dtype and data_ptr()."""

    def __init__(self, dtype: str, address: int):
        import torch

        self.dtype, self.address = getattr(torch, dtype), address

    def data_ptr(self) -> int:
        return self.address


def _decode(value):
    if isinstance(value, tuple) and value and value[0] == "ptr":
        return _Pointer(value[1], value[2])
    if isinstance(value, tuple) and value and value[0] == "desc":
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor(_decode(value[1]), value[2], value[3], value[4])
    return value


class _Recorder:
    def __init__(self, kernel, sink: list, case: Callable[[], str]):
        self.kernel, self.sink, self.case = kernel, sink, case

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            grid_ = grid(kwargs) if callable(grid) else tuple(grid)
            self.sink.append(Launch(self.case(), ("module", self.kernel.fn.__module__, self.kernel.__name__),
                                    tuple(int(g) for g in grid_), [_encode(a) for a in args],
                                    {k: _encode(v) for k, v in kwargs.items()}))
        return launch


@contextlib.contextmanager
def _recording(sms: int, arch: int):
    """Within: launching a kernel of kernels/ records it, and meta tensors run the custom ops' real code (a launcher
    that picks its tiles by `device_capability(device)` is told the arch being compiled for)."""
    import torch
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    current = ["?"]
    undo = []

    def patch(obj, attr, value):
        undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and attr.endswith("_kernel"):
                patch(module, attr, _Recorder(value, launches, lambda: current[0]))
            elif type(value).__name__ == "CustomOpDef" and value._init_fn is not None:
                patch(value, "_abstract_fn", value._init_fn)  # meta tensors run the real launcher
        replacements = {"use_triton": lambda *a, **k: True, "check_triton_device": lambda *a, **k: None,
                        "num_programs": lambda device, per_sm=2: per_sm * sms, "device_capability": lambda device: arch}
        for attr, value in replacements.items():
            if attr in vars(module):
                patch(module, attr, value)
    # Autocast has no meta device: report it off there (the cases pass the dtypes autocast would produce).
    is_enabled, get_dtype, autocast = torch.is_autocast_enabled, torch.get_autocast_dtype, torch.autocast
    patch(torch, "is_autocast_enabled", lambda *a: False if a and a[0] == "meta" else is_enabled(*a))
    patch(torch, "get_autocast_dtype", lambda d: torch.bfloat16 if d == "meta" else get_dtype(d))
    patch(torch, "autocast", lambda device_type, *a, **k: contextlib.nullcontext() if device_type == "meta"
          else autocast(device_type, *a, **k))
    try:
        yield launches, current
    finally:
        for obj, attr, value in reversed(undo):
            setattr(obj, attr, value)


def _attention_case(n_embd: int, n_head: int, B: int = 8, T: int = 1024) -> str:
    """GPT-2's attention layer forward and backward; returns how q, k, v were made."""
    import torch

    try:
        from fastlm.config import GPTConfig
        from fastlm.model import TRITON_OPS, CausalSelfAttention

        with torch.device("meta"):
            layer = CausalSelfAttention(GPTConfig(n_embd=n_embd, n_head=n_head), 0, TRITON_OPS).to(torch.bfloat16)
            x = torch.empty(B, T, n_embd, dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().sum().backward()
        return "fastlm.model.CausalSelfAttention"
    except (ImportError, AttributeError, TypeError) as e:  # the model changed shape: GPT-2's layout, stated here
        import kernels

        D = n_embd // n_head
        with torch.device("meta"):
            qkv = torch.empty(B, T, 3, n_head, D, dtype=torch.bfloat16, requires_grad=True)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        kernels.attention(q, k, v, causal=True).transpose(1, 2).reshape(B, T, n_embd).float().sum().backward()
        return f"assumed (B, T, 3, H, D) qkv views ({type(e).__name__}: {e})"


def _norm_case(N: int, rows: int = 8192, residual: bool = False) -> str:
    import torch

    import kernels

    with torch.device("meta"):
        branch = torch.empty(rows, N, dtype=torch.bfloat16, requires_grad=True)
        dtype = torch.float32 if residual else torch.bfloat16  # under autocast the parameters stay fp32
        w = torch.empty(N, dtype=dtype, requires_grad=True)
        b = torch.empty(N, dtype=dtype, requires_grad=True)
        stream = torch.empty(rows, N, dtype=torch.float32, requires_grad=True) if residual else None
    if residual:
        y, h = kernels.layer_norm(branch, w, b, 1e-5, residual=stream, out_dtype=torch.bfloat16)
        (y.float().sum() + h.sum()).backward()
        return "kernels.layer_norm(bf16 branch, residual=fp32 stream, out_dtype=bf16)"
    kernels.layer_norm(branch, w, b, 1e-5).float().sum().backward()
    return "kernels.layer_norm, bf16"


def _cross_entropy_case(fused: bool, rows: int = 8192, V: int = 50257, C: int = 768) -> str:
    import torch

    import kernels

    with torch.device("meta"):
        target = torch.empty(rows, dtype=torch.long)
        if fused:
            h = torch.empty(rows, C, dtype=torch.bfloat16, requires_grad=True)
            w = torch.empty(V, C, dtype=torch.bfloat16, requires_grad=True)
        else:
            logits = torch.empty(rows, V, dtype=torch.bfloat16, requires_grad=True)
    if fused:
        kernels.linear_cross_entropy(h, w, target).backward()
        return "kernels.linear_cross_entropy (its chunk buffer, row stride padded)"
    kernels.cross_entropy(logits, target).backward()
    return "kernels.cross_entropy, contiguous bf16 logits"


def _has_residual_norm() -> bool:
    import kernels

    return "residual" in inspect.signature(kernels.layer_norm).parameters


def fastlm_cases() -> list[tuple[str, Callable[[], str]]]:
    cases = [("attention D=64", lambda: _attention_case(768, 12)), ("attention D=128", lambda: _attention_case(2048, 16))]
    for N in (768, 1024, 1600, 4096):
        cases.append((f"layer_norm N={N}", lambda N=N: _norm_case(N)))
    if _has_residual_norm():
        for N in (768, 1024, 1600, 4096):
            cases.append((f"layer_norm+residual N={N}", lambda N=N: _norm_case(N, residual=True)))
    cases += [("cross_entropy V=50257", lambda: _cross_entropy_case(False)),
              ("linear_cross_entropy V=50257", lambda: _cross_entropy_case(True))]
    return cases


def record_launches(arch: int, only: str | None = None) -> tuple[list[Launch], dict[str, str]]:
    """Every launch of every case, and how each case made its inputs."""
    notes = {}
    with _recording(ARCHS[arch]["sms"], arch) as (recorded, current):
        for case, run in fastlm_cases():
            if only and not re.search(only, case):
                continue
            current[0] = case
            notes[case] = run()
    return recorded, notes


# -----------------------------------------------------------------------------------------------------------------
# Triton's tutorial 06, the reference (loaded from a copy given at run time; never part of the repository)

def _tutorial_module(path: str):
    """The tutorial's @triton.jit functions alone (its module code needs a GPU), written to a temporary file."""
    tree = ast.parse(Path(path).read_text())
    keep = ast.parse("import triton\nimport triton.language as tl").body
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                "jit" in ast.unparse(d) and "autotune" not in ast.unparse(d) for d in node.decorator_list):
            node.decorator_list = [d for d in node.decorator_list if "autotune" not in ast.unparse(d)]
            keep.append(node)
    out = Path(tempfile.gettempdir()) / "fastlm_tutorial06_kernels.py"
    out.write_text(ast.unparse(ast.Module(body=keep, type_ignores=[])) + "\n")
    return str(out)


def _load_file(path: str):
    spec = importlib.util.spec_from_file_location(f"_tutorial06_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tutorial_launches(path: str, arch: int, only: str | None = None) -> list[Launch]:
    """The tutorial's forward (causal, fp16) at GPT-2's shapes with the configs quoted in NOTES.md (128x64 and 4
    warps at D=64, 128x128 and 8 warps at D=128), and its backward with its fixed blocks (32/128/128/32, 4 warps,
    5 stages), as its host code would launch them; sm_90 gets host tensor descriptors, sm_80 pointers."""
    import torch

    file = _tutorial_module(path)
    B, T = 8, 1024
    launches = []
    for case, H, D, (bm, bn, warps) in [("attention D=64", 12, 64, (128, 64, 4)), ("attention D=128", 16, 128, (128, 128, 8))]:
        if only and not re.search(only, case):
            continue
        with torch.device("meta"):
            q, k, v, o = (torch.empty(B, H, T, D, dtype=torch.float16) for _ in range(4))
            M = torch.empty(B, H, T, dtype=torch.float32)
        if arch >= 90:
            from triton.tools.tensor_descriptor import TensorDescriptor

            rows = B * H * T
            descs = [TensorDescriptor(t, [rows, D], [D, 1], block) for t, block in
                     [(q, [bm, D]), (k, [bn, D]), (v, [bn, D]), (o, [bm, D])]]
        else:
            descs = [q, k, v, o]
        kwargs = dict(N_CTX=T, HEAD_DIM=D, FP8_OUTPUT=False, STAGE=3, warp_specialize=False, IS_HOPPER=arch == 90,
                      BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=3)
        args = [0.125, M, B, H, *descs]
        launches.append(Launch(case, ("file", file, "_attn_fwd"), (T // bm, B * H, 1), [_encode(a) for a in args],
                               {k_: _encode(v_) for k_, v_ in kwargs.items()}, label="tutorial06 _attn_fwd"))
        if D != 64:
            continue
        with torch.device("meta"):
            dq, dk, dv, do = (torch.empty(B, H, T, D, dtype=torch.float16) for _ in range(4))
            delta = torch.empty(B, H, T, dtype=torch.float32)
        args = [q, k, v, 0.125, do, dq, dk, dv, M, delta, *q.stride(), H, T]
        kwargs = dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, BLK_SLICE_FACTOR=2, HEAD_DIM=D,
                      num_warps=4, num_stages=5, CAUSAL=True)
        for label, loop in [("tutorial06 _attn_bwd dK/dV", "default"), ("tutorial06 _attn_bwd dQ", "after-first")]:
            launches.append(Launch(case, ("file", file, "_attn_bwd"), (T // 128, 1, B * H), [_encode(a) for a in args],
                                   {k_: _encode(v_) for k_, v_ in kwargs.items()}, label=label, loop=loop))
    return launches


# -----------------------------------------------------------------------------------------------------------------
# Compiling, and reading the SASS

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TENSOR_CORE = re.compile(r"^(HGMMA|HMMA|IMMA|QGMMA|IGMMA)\b")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text without predicate-free padding) of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(a, 16), ins) for a, ins in _INSTRUCTION.findall(text)]


def _opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split()[0] if ins else ""


def _branch_target(ins: str) -> int | None:
    m = re.match(r"^(?:@!?U?P\w+\s+)?(?:BRA|JMP)(?:\.\w+)*\s+(?:`?\(?\.?L?_?x?_?)?(0x[0-9a-f]+)", ins)
    return int(m.group(1), 16) if m else None


def find_loops(instructions: list[tuple[int, str]]) -> list[dict]:
    """Every backward branch closes a loop [target, branch]; returns the innermost ones in program order."""
    loops = []
    for address, ins in instructions:
        target = _branch_target(ins)
        if target is not None and target < address:
            body = [i for a, i in instructions if target <= a <= address]
            loops.append(dict(start=target, end=address, body=body))
    inner = [l for l in loops if not any(o is not l and l["start"] <= o["start"] and o["end"] <= l["end"] for o in loops)]
    return sorted(inner, key=lambda l: l["start"])


def whole_kernel(instructions: list[tuple[int, str]]) -> list[str]:
    """The kernel's body up to its last EXIT (the trailing self-branch and NOP padding excluded)."""
    last = max((i for i, (_, ins) in enumerate(instructions) if _opcode(ins) == "EXIT"), default=len(instructions) - 1)
    return [ins for _, ins in instructions[: last + 1]]


def choose_loop(loops: list[dict], rule: str = "default") -> dict | None:
    """The most tensor-core instructions, then the fewest instructions (the unmasked copy of a tile loop); with no
    MMA, the largest loop. "after-first": the same rule among the loops after the one the default picks."""
    if not loops:
        return None
    mma = lambda l: sum(bool(_TENSOR_CORE.match(_opcode(i))) for i in l["body"])
    key = lambda l: (mma(l), -len(l["body"])) if mma(l) else (0, len(l["body"]))
    best = max(loops, key=key)
    if rule == "after-first":
        later = [l for l in loops if l["start"] > best["end"]]
        return max(later, key=key) if later else None
    return best


def instruction_mix(body: list[str]) -> dict[str, Any]:
    """What the loop spends its instructions on, in a few classes, and the MMA shapes."""
    classes = collections.Counter()
    shapes = collections.Counter()
    widths = collections.Counter()
    for ins in body:
        op = _opcode(ins)
        base = op.split(".")[0]
        if _TENSOR_CORE.match(op):
            classes["mma"] += 1
            m = re.search(r"\.(\d+)x(\d+)x(\d+)", op)
            shapes[f"m{m.group(1)}n{m.group(2)}k{m.group(3)}" if m else op] += 1
            if base.endswith("GMMA") and re.search(r"HGMMA\S*\s+\S+,\s+gdesc", ins):
                classes["mma A from smem"] += 1
        elif base in ("LDG", "LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF", "LD"):
            classes["global load"] += 1
            m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
            widths[f"{base}.{m.group(1) if m else 32}"] += 1
        elif base in ("STG", "UTMASTG", "ST", "RED", "ATOMG"):
            classes["global store"] += 1
        elif base in ("LDS", "LDSM", "STS"):
            classes["shared"] += 1
        elif base in ("SHFL",):
            classes["shuffle"] += 1
        elif base in ("BAR", "SYNCS", "DEPBAR", "WARPGROUP", "ARRIVES", "MEMBAR", "LDGDEPBAR", "WARPSYNC"):
            classes["sync"] += 1
        elif base == "MUFU":
            classes["MUFU"] += 1
        elif base in ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "HFMA2", "HADD2", "HMUL2", "FMUL2",
                      "FADD2", "FFMA2"):
            classes["fp32 math"] += 1
        elif base in ("F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP"):
            classes["convert"] += 1
        elif base == "NOP":
            classes["NOP"] += 1
        else:
            classes["int/other"] += 1
    return dict(classes=dict(classes), mma_shapes=dict(shapes), load_widths=dict(widths))


def _specialisation(kernel, signature: dict, attrs: dict, constexprs: dict) -> str:
    """Which runtime ints the launcher marked 16-divisible (D), made constant 1, or left plain."""
    names = [p.name for p in kernel.params]
    divisible, ones, plain = [], [], []
    for i, name in enumerate(names):
        ty = signature.get(name)
        if ty == "constexpr":
            if (i,) in constexprs and constexprs[(i,)] == 1 and not kernel.params[i].is_constexpr:
                ones.append(name)
            continue
        if ty in ("i32", "i64"):
            (divisible if attrs.get((i,)) else plain).append(name)
    return f"ints div16: {','.join(divisible) or '-'}; =1: {','.join(ones) or '-'}; plain: {','.join(plain) or '-'}"


def _data_dtype(args: list) -> str:
    """The 16-bit dtype among the pointer arguments (the op's data), else the first pointer's."""
    dtypes = [a[1] if a[0] == "ptr" else a[1][1] for a in args if isinstance(a, tuple) and a and a[0] in ("ptr", "desc")]
    return next((d for d in dtypes if d in ("bfloat16", "float16")), dtypes[0] if dtypes else "?")


def _bind(launch: Launch, arch: int):
    """What `kernel[grid](*args)` would compile for `launch` on sm_<arch>: Triton's own binder and argument packing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kind, where, name = launch.kernel
    module = importlib.import_module(where) if kind == "module" else _load_file(where)
    kernel = getattr(module, name)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {k: _decode(v) for k, v in launch.kwargs.items()}
    bound, specialization, options = binder(*[_decode(a) for a in launch.args], **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return kernel, target, options, signature, constexprs, attrs, bound


def specialisation_key(launch: Launch, arch: int) -> tuple[str, Any]:
    """Launches with equal keys compile to the same binary (the fused head's chunks; norms whose widths share a block
    size); also returns the launch's constexprs and int arguments by name, which size its unit of work."""
    kernel, _, options, signature, constexprs, attrs, bound = _bind(launch, arch)
    key = repr((launch.name, launch.loop, sorted(options.__dict__.items()), signature, sorted(constexprs.items()),
                sorted(attrs.items())))
    values = {k: v for k, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)}
    values.update({kernel.params[path[0]].name: v for path, v in constexprs.items() if len(path) == 1})
    return key, values


def compile_launch(job: tuple[Launch, int]) -> dict:
    """Compile one launch as the launcher would, and measure it. Runs in a worker process."""
    launch, arch = job
    import triton
    from triton.compiler import ASTSource

    from tests.kernels.aot_compile import resource_usage

    kernel, target, options, signature, constexprs, attrs, bound = _bind(launch, arch)
    named = {kernel.params[path[0]].name: value for path, value in constexprs.items() if len(path) == 1}
    record = dict(case=launch.case, kernel=launch.name, arch=arch, grid=list(launch.grid),
                  dtype=_data_dtype(launch.args), num_warps=options.num_warps, num_stages=options.num_stages,
                  tile={k: v for k, v in named.items() if k.startswith("BLOCK")}, specialisation=_specialisation(kernel, signature, attrs, constexprs))
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # reported in the table and failed by the test
        record.update(ok=False, error=f"{type(e).__name__}: {e}"[:1500])
        return record
    instructions = sass_instructions(compiled.asm["cubin"])
    loops = find_loops(instructions)
    main = choose_loop(loops, launch.loop)
    body = main["body"] if main else whole_kernel(instructions)
    record.update(ok=True, shared=compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]),
                  loop="main loop" if main else "whole kernel", loops=[len(l["body"]) for l in loops],
                  instructions=len(body), mix=instruction_mix(body))
    return record


def occupancy(record: dict) -> dict:
    """Warps per SM that fit, and what limits them."""
    spec, warps = ARCHS[record["arch"]], record["num_warps"]
    per_warp = -(-record["registers"] * 32 // 256) * 256
    limits = {"regs": (spec["regs"] // per_warp) // warps if per_warp else spec["max_blocks"],
              "smem": spec["smem"] // (record["shared"] + 1024),
              "warps": spec["max_warps"] // warps, "blocks": spec["max_blocks"]}
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps, limited_by=limiter)


def _override(launches: list[Launch], settings: list[str]) -> list[Launch]:
    """--set KERNEL:KEY=VALUE,...: try other constexprs or options (BLOCK_M, num_warps, ...) without editing a kernel
    file; the row's grid is the unchanged launcher's."""
    for setting in settings:
        name, _, assignments = setting.partition(":")
        values = {}
        for item in filter(None, assignments.split(",")):
            key, _, value = item.partition("=")
            values[key] = ast.literal_eval(value) if re.match(r"^[-\d.]+$|^(True|False)$", value) else value
        for launch in launches:
            if launch.name == name:
                launch.kwargs.update(values)
                launch.case += f" [{assignments}]"
    return launches


def measure(arch: int, only: str | None = None, tutorial: str | None = None, workers: int = 2,
            settings: list[str] = ()) -> dict:
    import triton

    launches, notes = record_launches(arch, only)
    if tutorial:
        launches += tutorial_launches(tutorial, arch, only)
    launches = _override(launches, list(settings))
    groups: dict[str, list] = {}  # one compile per distinct binary; one row per case that launches it
    for launch in launches:
        key, values = specialisation_key(launch, arch)
        rows = groups.setdefault(key, [])
        if all(other.case != launch.case for other, _ in rows):
            rows.append((launch, values))
    with ProcessPoolExecutor(workers) as pool:
        compiled = list(pool.map(compile_launch, [(rows[0][0], arch) for rows in groups.values()]))
    records = []
    for first, rows in zip(compiled, groups.values()):
        for launch, values in rows:
            r = dict(first, case=launch.case, grid=list(launch.grid))
            if r["ok"]:
                unit, per_iteration = UNITS.get(launch.name, ("iteration", lambda c: 1))  # a kernel new to the tool
                r.update(unit=unit, per_unit=round(r["instructions"] * r["num_warps"] / per_iteration(values), 3))
                if unit == "row" and values.get("N"):
                    r.update(N=values["N"], per_element=round(r["per_unit"] / values["N"], 4))
            records.append(r)
    order = {case: i for i, case in enumerate(dict.fromkeys(l.case for l in launches))}
    notes = {l.case: notes.get(l.case, notes.get(l.case.split(" [")[0], "")) for l in launches if l.case in order}
    records.sort(key=lambda r: order[r["case"]])
    for r in records:
        if r["ok"]:
            r.update(occupancy(r))
            ref = REFERENCE.get((r["case"], r["kernel"])) if arch == 90 else None
            if ref:
                r["reference"], r["reference_from"] = ref
    return dict(triton=triton.__version__, arch=arch, source=_source_version(), notes=notes, tutorial=bool(tutorial),
                records=records)


def _source_version() -> str:
    """The commit the kernels were compiled from, and whether kernels/ differed from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes to kernels/" if git("status", "--porcelain", "--", "kernels") else "")


# -----------------------------------------------------------------------------------------------------------------
# The table

def _mix_text(mix: dict) -> str:
    c = mix["classes"]
    parts = []
    if mix["mma_shapes"]:
        smem_a = c.get("mma A from smem", 0)
        parts.append("MMA " + " + ".join(f"{n} {s}" for s, n in sorted(mix["mma_shapes"].items())) + (f" ({smem_a} A smem)" if smem_a else ""))
    if mix["load_widths"]:
        parts.append("loads " + "+".join(f"{n}x{w}" for w, n in sorted(mix["load_widths"].items())))
    for name in ("fp32 math", "MUFU", "convert", "shuffle", "shared", "sync", "int/other", "NOP"):
        if c.get(name):
            parts.append(f"{name} {c[name]}")
    return "; ".join(parts)


def ce_totals(records: list[dict]) -> dict[str, float]:
    """Cross-entropy forward + backward per logit, per case."""
    totals = collections.defaultdict(float)
    for r in records:
        if r["ok"] and r["kernel"].startswith("_cross_entropy"):
            totals[r["case"]] += r["per_unit"]
    return {case: round(v, 3) for case, v in totals.items()}


def render(result: dict) -> str:
    arch, spec = result["arch"], ARCHS[result["arch"]]
    lines = [f"# Static instruction counts, sm_{arch} ({spec['gpu']}), triton {result['triton']}", "",
             f"Kernels as of {result['source']}.", "",
             "**A static proxy, not a timing**: SASS instructions per thread in one iteration of each kernel's main loop "
             "(from an ahead-of-time compile on CPU, `cuobjdump -sass`), times its warps, per unit of work. "
             "Fewer is better at equal occupancy; it says nothing of memory stalls or latency. "
             "Regenerate: `python -m bench.static_counts --write` (method: the module docstring of "
             "bench/static_counts.py).", "",
             "Calls: GPT-2 training shapes, bf16, causal attention at B=8, T=1024; norms and cross-entropy over 8192 "
             "rows. Reference rows (`tutorial06 ...`) are Triton's tutorial 06 kernel (fp16) compiled the same way "
             "at its own configs." + ("" if result["tutorial"] else " (Not present in this run: no tutorial file was "
                                       f"given with --tutorial or {TUTORIAL_ENV}.)"), "",
             "| case | kernel | tile | warps | stages | regs | spill B | smem KB | warps/SM (limit) | grid | loop instr | "
             "warp-instr per unit | reference | main loop mix |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["records"]:
        tile = "x".join(str(v) for k, v in r["tile"].items() if k != "BLOCK_D") or "-"
        if not r["ok"]:
            lines.append(f"| {r['case']} | {r['kernel']} | {tile} | {r['num_warps']} | {r['num_stages']} | "
                         f"compile failed: {r['error'][:200]} | | | | | | | | |")
            continue
        per = f"{r['per_unit']:.4g} / {r['unit']}"
        if "per_element" in r:
            per += f" ({r['per_element']:.3g} / element)"
        ref = f"{r['reference']} ({r['reference_from']})" if "reference" in r else ""
        loops = "/".join(str(n) for n in r["loops"]) or "none"
        grid = "x".join(str(g) for g in r["grid"] if g != 1) or "1"
        lines.append(f"| {r['case']} | {r['kernel']} | {tile} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                     f"{r['stack']} | {r['shared'] / 1024:.1f} | {r['warps_per_sm']} ({r['limited_by']}) | {grid} | "
                     f"{r['instructions']} ({r['loop']}; loops {loops}) | {per} | {ref} | {_mix_text(r['mix'])} |")
    totals = ce_totals(result["records"])
    if totals:
        from kernels.softmax_cross_entropy import BLOCK_V

        lines += ["", "Cross-entropy forward + backward, warp-instructions per logit (per real logit of the row: a row of "
                  f"50257 takes {-(-50257 // BLOCK_V)} blocks of {BLOCK_V} slots); Liger-Kernel: {CE_REFERENCE}:", ""]
        lines += [f"- {case}: {v:.3g}" for case, v in totals.items()]
    lines += ["", "How each case's launches were made:", ""]
    lines += [f"- {case}: {how}" for case, how in result["notes"].items()]
    lines += ["", "Specialisation the launcher applied (ints divisible by 16 / equal to 1 / neither):", ""]
    seen = set()
    for r in result["records"]:
        key = (r["case"], r["kernel"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {r['case']} {r['kernel']}: {r['specialisation']}")
    return "\n".join(lines) + "\n"


def result_path(arch: int, version: str, suffix: str) -> Path:
    return RESULTS / f"static-counts-sm{arch}-triton{version}.{suffix}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90)
    parser.add_argument("--out", help="write the markdown table here (default: print it)")
    parser.add_argument("--json", help="write the records as JSON here")
    parser.add_argument("--write", action="store_true",
                        help="both archs, into bench/results/static-counts-sm<arch>-triton<version>.md/.json")
    parser.add_argument("--only", help="only the cases matching this regular expression")
    parser.add_argument("--tutorial", default=os.environ.get(TUTORIAL_ENV),
                        help=f"a copy of Triton's python/tutorials/06-fused-attention.py (or ${TUTORIAL_ENV})")
    parser.add_argument("--set", action="append", default=[], metavar="KERNEL:KEY=VALUE,...",
                        help="compile KERNEL with other constexprs/options, e.g. _attn_fwd_kernel:BLOCK_M=64,num_warps=4")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.write and (args.only or args.set):
        parser.error("--write regenerates the whole committed table: not with --only or --set")
    if args.tutorial and not Path(args.tutorial).is_file():
        parser.error(f"--tutorial {args.tutorial}: no such file")
    import triton

    for arch in (sorted(ARCHS, reverse=True) if args.write else [args.arch]):
        result = measure(arch, args.only, args.tutorial, args.workers, args.set)
        table = render(result)
        md = result_path(arch, triton.__version__, "md") if args.write else args.out
        js = result_path(arch, triton.__version__, "json") if args.write else args.json
        if md:
            Path(md).parent.mkdir(parents=True, exist_ok=True)
            Path(md).write_text(table)
            print(f"wrote {md}", file=sys.stderr)
        else:
            print(table)
        if js:
            Path(js).write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {js}", file=sys.stderr)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") != "0":  # the interpreter replaces the kernels: compile without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "bench.static_counts", *sys.argv[1:]], env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launcher's default; also silences 3.9's warning
    main()
