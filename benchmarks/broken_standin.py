"""A stand-in for a model that 4-bit breaks badly, made from SmolLM2-135M without new weights.

Function-preserving reparametrisation (the SmoothQuant move, used backwards as damage): in each
decoder layer, for a few seeded channels c of each RMSNorm that feeds Linears directly
(``input_layernorm`` -> q/k/v, ``post_attention_layernorm`` -> gate/up), divide the norm's weight
by s_c and multiply the following Linears' input column c by s_c. The 16-bit function is
unchanged: the Linear sees (γ_c / s_c)·n_c and multiplies it by s_c·W[:, c]. With s_c a power of
two both products are exact in bf16, so the 16-bit logits are bit-identical (checked and
recorded). The weights are not: column c now holds values s_c times the row's typical size, so
the absmax of every NF4 block (64 consecutive inputs of a row) that contains it is s_c times too
large, and the other 63 weights of that block round to a few levels near zero. One channel per
norm at 16/32 (the default) ruins one block in nine of every q/k/v/gate/up row (o_proj and
down_proj are left as they are): all-NF4 mean KLD 0.695 on the shipped held-out text against
SmolLM2's 0.329, with the 16-bit logits bit-identical (KL 0.0).

    python benchmarks/broken_standin.py [--out FOLDER] [--channels 1] [--scales 16,32] [--seed 0]

Writes a ``save_pretrained`` folder with the tokenizer (``quantplan run FOLDER`` reads it) and
``standin.json`` beside the weights: the channels and scales per norm, the 16-bit KL between
the original and the stand-in, and the all-NF4 mean KLD of both on the shipped held-out text.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

#: each RMSNorm that feeds Linears directly, and those Linears (Llama-family attribute names)
NORM_TARGETS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


@dataclass(frozen=True)
class Scaling:
    """One norm's reparametrisation: its channels and the power-of-two factor moved into the Linears."""

    norm: str  # full module name of the RMSNorm
    linears: tuple[str, ...]  # the Linears whose input columns were multiplied
    channels: tuple[int, ...]
    scales: tuple[float, ...]


def choose_scalings(model, channels: int, scales: tuple[float, ...], seed: int) -> list[Scaling]:
    """Seeded choice of ``channels`` channels per norm, each with a factor drawn from ``scales`` (powers of two)."""
    for s in scales:
        if s <= 1 or not float(s).is_integer() or int(s) & (int(s) - 1):
            raise ValueError(f"--scales {s}: give powers of two above 1 (exact in bf16), e.g. 16,32")
    generator = torch.Generator().manual_seed(seed)
    result = []
    for index, layer in enumerate(model.model.layers):
        for norm, linears in NORM_TARGETS.items():
            width = getattr(layer, norm).weight.numel()
            picked = torch.randperm(width, generator=generator)[:channels].sort().values.tolist()
            factors = [scales[i] for i in torch.randint(len(scales), (channels,), generator=generator).tolist()]
            result.append(Scaling(f"model.layers.{index}.{norm}", tuple(f"model.layers.{index}.{n}" for n in linears),
                                  tuple(picked), tuple(float(f) for f in factors)))
    return result


@torch.no_grad()
def reparametrise(model, scalings: list[Scaling]) -> None:
    """Apply ``scalings`` in place: norm weight / s on its channels, following Linears' columns × s."""
    modules = dict(model.named_modules())
    for scaling in scalings:
        index = torch.tensor(scaling.channels)
        factor = torch.tensor(scaling.scales)
        norm = modules[scaling.norm].weight
        norm[index] = (norm[index].float() / factor).to(norm.dtype)
        for name in scaling.linears:
            weight = modules[name].weight
            weight[:, index] = (weight[:, index].float() * factor).to(weight.dtype)


def mean_kl(model_p, model_q, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token KL(P || Q) over ``input_ids`` windows between two models' logits (float32)."""
    from quantplan.analysis.reference import forward_logits, token_kl

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(input_ids), batch_size):
            batch = {"input_ids": input_ids[start:start + batch_size]}
            logp = torch.log_softmax(forward_logits(model_p, batch).float(), -1)
            logq = torch.log_softmax(forward_logits(model_q, batch).float(), -1)
            kl = token_kl(logp, logq)
            total, count = total + float(kl.sum()), count + kl.numel()
    return total / max(count, 1)


def all_nf4_kld(model, input_ids: torch.Tensor) -> float:
    """Mean KLD of all-NF4 (every quantizable Linear but lm_head, blocksize 64) vs the 16-bit ``model``."""
    from quantplan.analysis import NF4
    from quantplan.analysis.simulate import QuantCache
    from quantplan.reports.fidelity import heldout_reference, measure_variants

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    reference = heldout_reference(model, input_ids)
    return float(measure_variants(reference, QuantCache(model, NF4), {"v": names})["v"].summary()["mean_kld"])


def default_folder(channels: int = 1, scales: tuple[float, ...] = (16.0, 32.0), seed: int = 0) -> Path:
    """Where the stand-in with these settings is kept by default: quantplan's cache (outside the repository)."""
    from quantplan.analysis.models import _cache_root

    return _cache_root() / f"smollm2-broken-standin-c{channels}-s{'-'.join(str(int(s)) for s in scales)}-seed{seed}"


def build(out: Path, channels: int = 1, scales: tuple[float, ...] = (16.0, 32.0), seed: int = 0,
          heldout: int = 16, seq_len: int = 256, measure_original: bool = True, model: str | None = None,
          dtype: str = "fp32") -> dict:
    """Reparametrise ``model`` (default: the offline SmolLM2) in bf16, save it to ``out`` (weights, tokenizer,
    standin.json) and return the record, measured in ``dtype`` (fp32: CPU bf16 matmuls are ~50x slower)."""
    from quantplan.analysis import load_calibration, load_model, load_processor, resolve_source
    from quantplan.analysis.models import dtype_from_name

    source = resolve_source(model)
    original, tokenizer = load_model(source), load_processor(source)
    standin = load_model(source)
    scalings = choose_scalings(standin, channels, scales, seed)
    reparametrise(standin, scalings)
    out.mkdir(parents=True, exist_ok=True)
    standin.save_pretrained(out)
    tokenizer.save_pretrained(out)
    original, standin = original.to(dtype_from_name(dtype)), standin.to(dtype_from_name(dtype))
    ids = load_calibration(tokenizer, "heldout", heldout, seq_len).input_ids
    record = {"base": source.model_id, "base_fingerprint": source.fingerprint, "channels_per_norm": channels,
              "scales": list(scales), "seed": seed, "heldout_tokens": int(ids.numel()), "measured_in": dtype,
              "kl_16bit_original_vs_standin": mean_kl(original, standin, ids),
              "all_nf4_kld_standin": all_nf4_kld(standin, ids),
              "all_nf4_kld_original": all_nf4_kld(original, ids) if measure_original else None,
              "scalings": [asdict(s) for s in scalings]}
    tmp = out / "standin.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / "standin.json")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Llama-family folder or hub id (default: the offline SmolLM2)")
    parser.add_argument("--out", default=None, help="folder to write the stand-in to (default: default_folder())")
    parser.add_argument("--channels", type=int, default=1, help="channels rescaled per norm")
    parser.add_argument("--scales", default="16,32", help="powers of two the channels' columns are multiplied by")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows measured")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", help="dtype the KLs are measured in (the folder is saved in bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = tuple(float(s) for s in args.scales.split(","))
    if args.model and not args.out:
        parser.error("--model needs --out (the default folder is named for SmolLM2)")
    args.out = args.out or str(default_folder(args.channels, scales, args.seed))
    record = build(Path(args.out), args.channels, scales, args.seed, args.heldout, args.seq_len,
                   model=args.model, dtype=args.dtype)
    print(f"wrote {args.out}: 16-bit KL original vs stand-in {record['kl_16bit_original_vs_standin']:.2e}; "
          f"all-NF4 KLD stand-in {record['all_nf4_kld_standin']:.4f} (original {record['all_nf4_kld_original']:.4f}) "
          f"on {record['heldout_tokens']} held-out tokens")


if __name__ == "__main__":
    main()
