"""Layouts that look like FP8 (or sit next to it on the Hub) but that fp8convert does not convert: each is
recognised and refused with a message naming the layout and why, so it is never misread (FORMATS.md L9-L11,
§4 and §7)."""

from __future__ import annotations

from collections.abc import Callable

from fp8convert.errors import UnsupportedSchemeError
from fp8convert.formats.base import find_quant_config
from fp8convert.shards import Checkpoint
from fp8convert.spec import FP8_DTYPES, dtype_name

#: quant_method values of layouts that are not FP8 weights at all
NOT_FP8 = {
    "gptq": "GPTQ (int4/int8 weights)",
    "awq": "AWQ (int4 weights)",
    "bitsandbytes": "bitsandbytes (int8/nf4)",
    "mxfp4": "MXFP4 (4-bit weights)",
    "nvfp4": "NVFP4 (4-bit weights)",
    "hqq": "HQQ",
    "eetq": "EETQ (int8)",
    "aqlm": "AQLM",
    "quanto": "optimum-quanto",
    "exl2": "ExLlamaV2",
    "gguf": "GGUF",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "spqr": "SpQR",
    "fp_quant": "FP-Quant (4-bit)",
    "bitnet": "BitNet",
}


def _torchao(ckpt: Checkpoint, config: dict, qc: dict) -> str | None:
    if str(qc.get("quant_method", "")).lower() != "torchao":
        return None
    quant_type = qc.get("quant_type")
    return (
        f"torchao (quant_type {quant_type!r}; FORMATS.md L9) stores tensor subclasses (`_weight_qdata`, "
        "`_weight_scale`) whose layout depends on the torchao version; fp8convert does not read them. Convert "
        "with a compressed-tensors FP8 export instead"
    )


def _mxfp8(ckpt: Checkpoint, config: dict, qc: dict) -> str | None:
    method = str(qc.get("quant_method", "")).lower()
    quantization = qc.get("quantization")
    algo = str(qc.get("quant_algo") or (quantization if isinstance(quantization, dict) else {}).get("quant_algo") or "")
    groups = qc.get("config_groups")  # of any type here: the reader that claims the layout checks its types
    ct_mx = qc.get("format") == "mxfp8-quantized" or any(
        isinstance(g, dict)
        and (
            g.get("format") == "mxfp8-quantized"
            or (isinstance(g.get("weights"), dict) and str(g["weights"].get("scale_dtype", "")).endswith("uint8"))
        )
        for g in (groups.values() if isinstance(groups, dict) else ())
    )
    if method == "mxfp8" or algo.upper() == "MXFP8" or ct_mx:
        return (
            "MXFP8 (FORMATS.md L10): fp8 values with one e8m0 exponent per 32 weights; the AIU stack has no "
            "MX scales and requantizing them is not supported"
        )
    return None


def _deepseek_v4(ckpt: Checkpoint, config: dict, qc: dict) -> str | None:
    if str(qc.get("quant_method", "")).lower() == "fp8" and (
        qc.get("expert_dtype") == "fp4" or str(config.get("model_type", "")).startswith("deepseek_v4")
    ):
        return (
            "DeepSeek-V4 native (FORMATS.md L11): the experts are FP4 packed into int8 with e8m0 scales, "
            "not FP8; not supported"
        )
    return None


def _not_fp8(ckpt: Checkpoint, config: dict, qc: dict) -> str | None:
    method = str(qc.get("quant_method", "")).lower().replace("-", "_")
    if method in NOT_FP8:
        return f"{NOT_FP8[method]} is not an FP8 layout (quant_method {qc.get('quant_method')!r})"
    if method in ("auto_round", "intel/auto_round") and qc.get("packing_format") != "auto_round:fp8":
        return f"AutoRound with packing_format {qc.get('packing_format')!r} is not FP8"
    return None


def _unknown_fp8_flags(ckpt: Checkpoint, config: dict, qc: dict) -> str | None:
    if config.get("use_fp8_e4m3") and not qc:
        return (
            "config.json has `use_fp8_e4m3` and no quantization_config: a private FP8 layout (e.g. "
            "FriendliAI) whose scale convention is not documented; not supported"
        )
    return None


RULES: list[Callable[[Checkpoint, dict, dict], str | None]] = [
    _deepseek_v4,
    _mxfp8,
    _torchao,
    _not_fp8,
    _unknown_fp8_flags,
]


def refusal(ckpt: Checkpoint, config: dict) -> UnsupportedSchemeError | None:
    """The error for a checkpoint in a layout fp8convert recognises but does not convert, else None."""
    qc = find_quant_config(config, legacy_compression_config=True)[0] or {}
    for rule in RULES:
        why = rule(ckpt, config, qc)
        if why:
            fp8 = sum(r.dtype in FP8_DTYPES for r in ckpt.tensors.values())
            dtypes = sorted({dtype_name(r.dtype) for r in ckpt.tensors.values()})
            return UnsupportedSchemeError(
                f"unsupported layout: {why}",
                where=str(ckpt.root),
                problems=[f"tensor dtypes seen: {', '.join(dtypes)} ({fp8} fp8 tensors)"],
                hint="use an FP8 checkpoint in a supported layout (README 'Supported formats')",
            )
    return None
