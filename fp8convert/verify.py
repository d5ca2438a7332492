"""Verification of a conversion output, and the CPU smoke test.

``verify`` re-reads what ``convert`` wrote: file checksums against the report, the AIU config block and
every tensor against the spec, per-layer numbers against the source, and (with the ``aiu-check`` extra)
IBM's own loader plus bit-exactness of every fms-mo ``FP8Linear`` against ``FakeQuantLinear``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from fp8convert.errors import CheckpointError, VerificationError
from fp8convert.fakequant import FakeQuantLinear, load_cpu_model, read_cpu_plan
from fp8convert.formats import open_source
from fp8convert.numerics import ErrorStats, dequantize_linear, fp8_nan_count
from fp8convert.shards import Checkpoint, read_json, sha256_file
from fp8convert.spec import CPU_PLAN_NAME, ActScheme, Granularity, Numerics

logger = logging.getLogger(__name__)

REPORT_NAME = "fp8convert-report.json"
#: One extra e4m3 rounding moves a normal value by at most 2^-4 of itself, so noise <= 2^-8 of the signal:
#: SQNR >= 20*log10(2^4) = 24.08 dB. Anything below means more than requantization happened.
SQNR_FLOOR_DB = 24.0
#: AIU_TARGET.md: Spyre casts bf16 scales to fp16; below 2^-14 they become fp16 subnormals.
FP16_NORMAL_MIN, FP16_MAX = 2.0**-14, 65504.0
#: fms name -> HF name for the FP8 linears of Llama and Granite (AIU_TARGET.md 2.3).
FMS_TO_HF = {
    "attn.in_proj.query": "self_attn.q_proj",
    "attn.in_proj.key": "self_attn.k_proj",
    "attn.in_proj.value": "self_attn.v_proj",
    "attn.dense": "self_attn.o_proj",
    "ff_sub_layer.wg": "mlp.gate_proj",
    "ff_sub_layer.w1": "mlp.up_proj",
    "ff_sub_layer.w2": "mlp.down_proj",
}


class _Checks:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, detail: str = "", *, warning: bool = False) -> None:
        self.items.append({"check": name, "ok": ok, "detail": detail, "severity": "warning" if warning else "error"})

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [c for c in self.items if not c["ok"] and c["severity"] == "error"]


def verify(
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    aiu_check: bool | None = None,
    sqnr_floor: float = SQNR_FLOOR_DB,
) -> dict[str, Any]:
    """Check a conversion output directory; raise ``VerificationError`` listing every failed check."""
    out = Path(out_dir)
    report = read_json(out / REPORT_NAME, what=REPORT_NAME)
    checks = _Checks()
    _check_files(out, report, checks)
    aiu_dir, cpu_dir = out / "aiu", out / "cpu"
    tensors_dir = aiu_dir if aiu_dir.is_dir() else cpu_dir
    ckpt = Checkpoint(tensors_dir)
    checks.add(
        "safetensors headers",
        not ckpt.problems,
        "; ".join(ckpt.problems) or f"{len(ckpt.files)} shard(s), {len(ckpt.tensors)} tensors",
    )
    if aiu_dir.is_dir():
        _check_aiu_structure(aiu_dir, ckpt, report, checks)
    if cpu_dir.is_dir():
        _check_cpu_plan(cpu_dir, ckpt, checks)
    src = Path(source) if source else Path(report["source"]["path"])
    if src.is_dir():
        _check_numbers(src, ckpt, report, checks, sqnr_floor)
    else:
        checks.add("numbers against the source", True, f"skipped: source {src} not found", warning=True)
    if aiu_dir.is_dir() and aiu_check is not False:
        if _fms_available():
            _check_fms(aiu_dir, checks)
        else:
            install = 'pip install "fp8convert[aiu-check]"'
            # asked for explicitly: a failure; by default: say it was skipped
            checks.add(
                "IBM loader",
                not aiu_check,
                f"not installed: {install}"
                if aiu_check
                else f"skipped: ibm-fms / fms-model-optimizer not installed ({install})",
                warning=not aiu_check,
            )
    ckpt.close()
    result = {"command": "verify", "output": str(out), "checks": checks.items, "ok": not checks.failures}
    if checks.failures:
        raise VerificationError(
            f"{len(checks.failures)} check(s) failed",
            where=str(out),
            problems=[f"{c['check']}: {c['detail']}" for c in checks.failures],
            hint="re-run `fp8convert convert --overwrite`; if it fails again, report a bug",
        )
    return result


def _check_files(out: Path, report: dict, checks: _Checks) -> None:
    bad = []
    for rel, info in report["files"].items():
        path = out / rel
        if not path.is_file():
            bad.append(f"{rel} missing")
        elif path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
            bad.append(f"{rel} differs from the report (size or sha256)")
    checks.add("checksums", not bad, "; ".join(bad) or f"{len(report['files'])} files match the report")


def _check_aiu_structure(aiu_dir: Path, ckpt: Checkpoint, report: dict, checks: _Checks) -> None:
    from fp8convert.writers import aiu

    config = read_json(aiu_dir / "config.json", what="config.json")
    arch = aiu.architecture_problems(config)
    checks.add("AIU architecture", not arch, "; ".join(arch) or f"{(config.get('architectures') or ['?'])[0]}")
    gran, act = Granularity(report["target"]["weights"]), ActScheme(report["target"]["activations"])
    want = aiu.quantization_config(gran, act)
    checks.add(
        "AIU quantization_config",
        config.get("quantization_config") == want,
        "differs from the AIU spec block" if config.get("quantization_config") != want else "matches the spec",
    )
    dtype_ok = all(config.get(k) == "bfloat16" for k in ("torch_dtype", "dtype") if k in config)
    checks.add("AIU dtype", dtype_ok, "bfloat16" if dtype_ok else "torch_dtype/dtype must be bfloat16")
    problems, warnings = [], []
    modules = {k.rsplit(".", 1)[0] for k in ckpt.tensors if k.endswith(".weight_scale")}
    for key, ref in ckpt.tensors.items():
        module, _, suffix = key.rpartition(".")
        if module in modules:
            want_shape = {
                "weight": None,
                "weight_scale": (ref.shape[0], 1) if gran is Granularity.CHANNEL else (1,),
                "input_scale": (1,),
                "bias": None,
            }.get(suffix, "unexpected")
            if want_shape == "unexpected" or (suffix == "input_scale" and act is not ActScheme.STATIC_TENSOR):
                problems.append(f"{key}: unexpected tensor on a quantized module")
                continue
            if suffix == "weight":
                if ref.dtype != torch.float8_e4m3fn or len(ref.shape) != 2:
                    problems.append(f"{key}: {ref.dtype} {list(ref.shape)}, expected float8_e4m3fn [out, in]")
                elif nan := fp8_nan_count(ckpt.load(key)):
                    problems.append(f"{key}: {nan} fp8 NaN codes")
                continue
            if ref.dtype != torch.bfloat16:
                problems.append(f"{key}: {ref.dtype}, expected bfloat16")
            if suffix == "weight_scale":
                rows = ckpt.ref(f"{module}.weight").shape[0]
                expect = (rows, 1) if gran is Granularity.CHANNEL else (1,)
                if ref.shape != expect:
                    problems.append(f"{key}: shape {list(ref.shape)}, expected {list(expect)}")
            if suffix in ("weight_scale", "input_scale"):
                s = ckpt.load(key).float()
                if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
                    problems.append(f"{key}: non-finite or non-positive scale")
                elif float(s.min()) < FP16_NORMAL_MIN or float(s.max()) > FP16_MAX:
                    warnings.append(f"{key}: scale outside fp16's normal range [2^-14, 65504] (Spyre casts to fp16)")
        elif ref.dtype not in (torch.bfloat16,) and ref.dtype.is_floating_point:
            problems.append(f"{key}: {ref.dtype}; unquantized tensors of the AIU artifact are bfloat16")
    for m in modules:
        if act is ActScheme.STATIC_TENSOR and f"{m}.input_scale" not in ckpt.tensors:
            problems.append(f"{m}.input_scale missing (static activations)")
    decoder = {k.rsplit(".", 1)[0] for k in ckpt.tensors if aiu.DECODER_LINEAR.match(k.rsplit(".", 1)[0])}
    left = sorted(decoder - modules)
    if left:
        problems.append(f"decoder linears not quantized: {', '.join(left[:5])}")
    checks.add("AIU tensors", not problems, "; ".join(problems[:20]) or f"{len(modules)} FP8 linears match the spec")
    if warnings:
        checks.add("AIU scale range", False, "; ".join(warnings[:10]), warning=True)


def _check_cpu_plan(cpu_dir: Path, ckpt: Checkpoint, checks: _Checks) -> None:
    try:
        plan = read_cpu_plan(cpu_dir)
    except CheckpointError as exc:
        checks.add(CPU_PLAN_NAME, False, exc.message)
        return
    bad = [m for m in plan["modules"] if f"{m}.weight_scale" not in ckpt.tensors]
    checks.add(
        CPU_PLAN_NAME,
        not bad,
        f"modules without tensors: {bad[:5]}" if bad else f"{len(plan['modules'])} fake-quant modules",
    )


def _check_numbers(src: Path, ckpt: Checkpoint, report: dict, checks: _Checks, floor: float) -> None:
    """Dequantized converted weights against the dequantized source: equal where the report says exact,
    SQNR >= floor where requantized."""
    s_ckpt, _config, reader, plan = open_source(src, report["source"]["format"])
    problems, measured, sqnrs = [], 0, []
    for lin in plan.linears:
        rec = report["layers"].get(lin.module)
        if rec is None or f"{lin.module}.weight_scale" not in ckpt.tensors:
            continue
        ref = dequantize_linear(reader.read_linear(s_ckpt, lin))
        w = ckpt.load(f"{lin.module}.weight").float()
        s = ckpt.load(f"{lin.module}.weight_scale").float()
        got = w * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1))
        stats = ErrorStats()
        stats.add(ref, got)
        measured += 1
        if rec["sqnr_db"] is None:
            if stats.noise != 0:
                problems.append(
                    f"{lin.module}: the report says the weights are exact, but {stats.changed} values differ"
                )
        else:
            sqnrs.append(stats.sqnr_db)
            if stats.sqnr_db < floor:
                problems.append(f"{lin.module}: SQNR {stats.sqnr_db:.1f} dB < {floor} dB")
    s_ckpt.close()
    checks.add(
        "numbers against the source",
        not problems,
        "; ".join(problems[:20])
        or f"{measured - len(sqnrs)} layers exact as reported"
        + (f", {len(sqnrs)} requantized with SQNR >= {min(sqnrs):.1f} dB (floor {floor} dB)" if sqnrs else ""),
    )


def _fms_available() -> bool:
    """Import IBM's loader quietly (fms-mo warns that it overrides aten::_scaled_mm; torchao about triton)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torchao").setLevel(logging.ERROR)
        try:
            import fms.models  # noqa: F401
            import fms_mo.aiu_addons.fp8.fp8_linear  # noqa: F401
        except Exception:  # any import failure means the extra is unusable
            return False
    return True


def _fakequant_like(module: Any, numerics: Numerics) -> FakeQuantLinear:
    """A FakeQuantLinear holding an fms-mo FP8Linear's own tensors and scheme."""
    cfg = module.linear_config
    gran = Granularity.TENSOR if cfg["weights"]["strategy"] == "tensor" else Granularity.CHANNEL
    ia = cfg["input_activations"]
    if ia is None:
        act = ActScheme.NONE
    elif ia["strategy"] == "tensor":
        act = ActScheme.DYNAMIC_TENSOR if ia["dynamic"] else ActScheme.STATIC_TENSOR
    else:
        act = ActScheme.DYNAMIC_TOKEN
    fq = FakeQuantLinear(
        module.in_features,
        module.out_features,
        bias=module.has_bias,
        weight_granularity=gran,
        activation=act,
        numerics=numerics,
        scale_dtype=module.weight_scale.dtype,
    )
    fq.weight, fq.weight_scale = module.weight.data, module.weight_scale.data
    if module.has_bias:
        fq.bias = module.bias.data
    if act is ActScheme.STATIC_TENSOR:
        fq.input_scale = module.input_scale.data
    return fq


def fms_linear_check(model: Any, *, seed: int = 0) -> tuple[int, list[str]]:
    """Run every fms-mo FP8Linear and the matching FakeQuantLinear (fallback and fms-mo numerics) on the same
    inputs, including an all-zero token; return (compared, mismatches)."""
    from fms_mo.aiu_addons.fp8.fp8_linear import FP8Linear

    g = torch.Generator().manual_seed(seed)
    compared, bad = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, FP8Linear):
            continue
        x = (torch.randn(2, 7, module.in_features, generator=g) * 2).to(torch.bfloat16)
        x[0, 3] = 0
        x[1, 1, :4] = 40.0  # outliers
        want = module(x)
        for numerics in (Numerics.FALLBACK, Numerics.FMS_MO):
            got = _fakequant_like(module, numerics)(x)
            compared += 1
            if not torch.equal(want, got):
                bad.append(f"{name} ({numerics}): max diff {float((want.float() - got.float()).abs().max()):.3g}")
    return compared, bad


def _check_fms(aiu_dir: Path, checks: _Checks) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fms.models import get_model

        try:
            model = get_model(
                "hf_pretrained", model_path=str(aiu_dir), device_type="cpu", data_type=None, fused_weights=False
            )
            logits = model(torch.tensor([[1, 5, 9, 30, 3, 7, 2]]))
        except Exception as exc:  # the loader's own failure is the finding
            checks.add("IBM loader", False, f"fms get_model/forward failed: {type(exc).__name__}: {exc}")
            return
        finite = bool(torch.isfinite(logits).all())
        checks.add(
            "IBM loader",
            finite,
            f"get_model + forward: logits {list(logits.shape)}" + ("" if finite else " contain NaN/Inf"),
        )
        compared, bad = fms_linear_check(model)
    checks.add(
        "fms-mo FP8Linear == FakeQuantLinear (bit-exact)",
        compared > 0 and not bad,
        "; ".join(bad[:10]) or f"{compared} comparisons bit-identical",
    )


def smoke_test(
    cpu_dir: str | Path,
    *,
    prompt: str = "The capital of France is",
    numerics: str = "fallback",
    min_cosine: float = 0.99,
) -> dict[str, Any]:
    """Run a prompt through the CPU variant and through the dequantized bf16 reference; compare logits."""
    cpu_dir = Path(cpu_dir)
    ids, source = _prompt_ids(cpu_dir, prompt)
    model = load_cpu_model(cpu_dir, numerics=numerics)
    reference = load_cpu_model(cpu_dir)
    for name, module in list(reference.named_modules()):
        if isinstance(module, FakeQuantLinear):
            lin = torch.nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, dtype=torch.bfloat16
            )
            lin.weight = torch.nn.Parameter(module.dequantized_weight(torch.bfloat16), requires_grad=False)
            if module.bias is not None:
                lin.bias = torch.nn.Parameter(module.bias.to(torch.bfloat16), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, child, lin)
    with torch.inference_mode():
        got = model(torch.tensor([ids])).logits.float()[0]
        ref = reference(torch.tensor([ids])).logits.float()[0]
    cos = float(torch.nn.functional.cosine_similarity(got.reshape(1, -1), ref.reshape(1, -1)).item())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    rel = float((got - ref).norm() / ref.norm()) if float(ref.norm()) else math.inf
    finite = bool(torch.isfinite(got).all())
    result = {
        "command": "smoke-test",
        "model": str(cpu_dir),
        "numerics": numerics,
        "tokens": len(ids),
        "token_source": source,
        "cosine": cos,
        "top1_agreement": top1,
        "rel_l2": rel,
        "finite": finite,
        "min_cosine": min_cosine,
        "ok": finite and cos >= min_cosine,
    }
    if not result["ok"]:
        raise VerificationError(
            "CPU variant logits disagree with the dequantized bf16 reference",
            where=str(cpu_dir),
            problems=[
                f"cosine {cos:.4f} (required >= {min_cosine}), top-1 agreement {top1:.2f}, "
                f"rel-L2 {rel:.3g}, finite {finite}"
            ],
            hint="run `fp8convert verify` on the output directory",
        )
    return result


def _prompt_ids(cpu_dir: Path, prompt: str) -> tuple[list[int], str]:
    if (cpu_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(cpu_dir / "tokenizer.json")).encode(prompt).ids
        if ids:
            return ids, "tokenizer.json"
    config = json.loads((cpu_dir / "config.json").read_text())
    vocab = int(config.get("vocab_size", 32))
    return [(7 * i + 1) % vocab for i in range(8)], "fixed token ids (no tokenizer.json)"
