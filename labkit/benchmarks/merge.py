"""Benchmark: ``labkit merge`` (lazy, tensor by tensor) vs loading whole state dicts, and vs mergekit.

Synthetic Llama-shaped checkpoints (a base and two fine-tunes, float32 safetensors; a few hundred
MB each in full mode, a few MB in smoke mode) are merged with ``linear`` and ``ties`` three ways,
each in a fresh Python process so the peak resident memory (ru_maxrss) belongs to that merge only:
  * labkit: ``run_merge_config`` on a YAML file (streams one tensor at a time, checking each for NaN/inf);
  * naive (the baseline a user would otherwise write): ``safetensors.torch.load_file`` every
    checkpoint, merge in memory (``labkit.merge.merge``), ``save_file`` the result;
  * mergekit's ``run_merge`` on the same YAML, when mergekit is importable (it is not a labkit
    dependency; the row says "not installed" otherwise and no ratio is made up).
Memory is the process's peak RSS (VmHWM, reset just before the merge) minus its RSS at that point,
so imports are not counted; Linux only (/proc), "None" elsewhere.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from labkit.device import get_device

WORKER = textwrap.dedent("""
    import json, shutil, sys, time
    kind, cfg_path, out, device = sys.argv[1:5]
    import torch, yaml
    from safetensors.torch import load_file, save_file
    import labkit.merge as M
    from labkit.merge.yaml_runner import run_merge_config  # imported before the clock starts
    if kind == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

    def status_mb(key):  # VmRSS: resident now; VmHWM: peak of this process image only
        for line in open("/proc/self/status"):  # (ru_maxrss would include the parent's peak: it survives exec)
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return None

    cfg = yaml.safe_load(open(cfg_path))
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    except OSError:
        pass
    before = status_mb("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "labkit":
        run_merge_config(cfg_path, out, device=device, verbose=False)
    elif kind == "naive":
        models = [m["model"] for m in cfg["models"]]
        sds = [load_file(f"{m}/model.safetensors") for m in models]
        weights = [m["parameters"]["weight"] for m in cfg["models"]]
        if cfg["merge_method"] == "linear":
            merged = M.merge("linear", sds, weight=weights, device=device)
        else:
            base = load_file(f"{cfg['base_model']}/model.safetensors")
            merged = M.merge(cfg["merge_method"], sds, base, weight=weights, device=device,
                             density=[m["parameters"]["density"] for m in cfg["models"]])
        save_file(merged, f"{out}/model.safetensors")
        shutil.copy(f"{models[0]}/config.json", f"{out}/config.json")
    else:
        run_merge(MergeConfiguration.model_validate(cfg), out,
                  MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                               device="cuda" if device.startswith("cuda") else "cpu"))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = status_mb("VmHWM")
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    print("RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                                  "peak_rss_mb": None if peak is None else peak - before, "gpu_peak_mb": gpu}))
""")


def make_checkpoints(root: Path, smoke: bool) -> tuple[list[str], int, int]:
    """A base and two fine-tunes with Llama tensor names; returns (names, bytes per model, largest tensor)."""
    hidden, inter, layers, vocab = (128, 352, 2, 2048) if smoke else (1024, 2816, 4, 8192)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        for p in ("q", "k", "v", "o"):
            shapes[f"model.layers.{i}.self_attn.{p}_proj.weight"] = (hidden, hidden)
        shapes[f"model.layers.{i}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": inter,
              "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 2048, "tie_word_embeddings": False}
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    names = ["base", "ft0", "ft1"]
    for name in names:
        sd = base if name == "base" else {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        (root / name).mkdir()
        save_file(sd, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(config))
    per_model = sum(v.numel() * 4 for v in base.values())
    largest = max(v.numel() * 4 for v in base.values())
    return names, per_model, largest


def _mergekit_version() -> str | None:
    code = "import importlib.metadata as m, mergekit; print(m.version('mergekit'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def _run_once(kind: str, cfg: Path, out: Path, device: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", WORKER, kind, str(cfg), str(out), device],
                       capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} merge failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _same_output(a: Path, b: Path) -> tuple[float, int]:
    """(max |a - b|, number of entries differing by more than 1e-6) over every tensor."""
    from labkit.merge.safetensors_io import ModelDir

    da, db = ModelDir(a), ModelDir(b)
    diffs = [(da.read(k).float() - db.read(k).float()).abs() for k in da.specs]
    return max(float(d.max()) for d in diffs), sum(int((d > 1e-6).sum()) for d in diffs)


def run(smoke: bool = False) -> dict:
    import yaml

    device = str(get_device())
    repeat = 3 if smoke else 2
    mk_version = _mergekit_version()
    rows = []
    with tempfile.TemporaryDirectory(prefix="labkit-bench-merge-") as tmp:
        root = Path(tmp)
        names, per_model, largest = make_checkpoints(root, smoke)
        for method in ("linear", "ties"):
            if method == "linear":
                cfg = {"merge_method": "linear", "dtype": "float32",
                       "models": [{"model": str(root / n), "parameters": {"weight": 1.0}} for n in names]}
                n_inputs = 3
            else:
                cfg = {"merge_method": "ties", "dtype": "float32", "base_model": str(root / "base"),
                       "models": [{"model": str(root / n), "parameters": {"weight": 1.0, "density": 0.3}}
                                  for n in names[1:]]}
                n_inputs = 3
            cfg_path = root / f"{method}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            tools = ["labkit", "naive"] + (["mergekit"] if mk_version else [])
            runs = {k: [] for k in tools}
            for _ in range(repeat):  # interleaved, so a busy moment on a shared machine hits every tool
                for k in tools:
                    runs[k].append(_run_once(k, cfg_path, root / f"out_{k}", device))
            best = {k: {"seconds": min(r["seconds"] for r in v), "cpu_seconds": min(r["cpu_seconds"] for r in v),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in v)} for k, v in runs.items()}
            lab, naive = best["labkit"], best["naive"]
            diff, n_diff = _same_output(root / "out_labkit", root / "out_naive")
            bound_mb = (n_inputs + 2) * largest / 2**20
            common = {"method": method, "inputs_MB": n_inputs * per_model / 2**20, "bound_MB": bound_mb}
            rows.append({**common, "tool": "naive load-all (baseline)", "seconds": naive["seconds"],
                         "cpu_s": naive["cpu_seconds"], "peak_rss_MB": naive["peak_rss_mb"], "time_ratio": 1.0,
                         "cpu_ratio": 1.0, "mem_ratio": 1.0,
                         "max_abs_diff": 0.0, "n_diff": 0})
            rows.append({**common, "tool": "labkit merge", "seconds": lab["seconds"], "cpu_s": lab["cpu_seconds"],
                         "peak_rss_MB": lab["peak_rss_mb"], "time_ratio": lab["seconds"] / naive["seconds"],
                         "cpu_ratio": lab["cpu_seconds"] / naive["cpu_seconds"],
                         "mem_ratio": lab["peak_rss_mb"] / max(naive["peak_rss_mb"], 1e-9), "max_abs_diff": diff,
                         "n_diff": n_diff})
            if mk_version:
                mk = best["mergekit"]
                mk_diff, mk_n = _same_output(root / "out_labkit", root / "out_mergekit")
                rows.append({**common, "tool": f"mergekit {mk_version}", "seconds": mk["seconds"],
                             "cpu_s": mk["cpu_seconds"], "peak_rss_MB": mk["peak_rss_mb"],
                             "time_ratio": mk["seconds"] / naive["seconds"],
                             "cpu_ratio": mk["cpu_seconds"] / naive["cpu_seconds"],
                             "mem_ratio": mk["peak_rss_mb"] / max(naive["peak_rss_mb"], 1e-9),
                             "max_abs_diff": mk_diff, "n_diff": mk_n})
            else:
                rows.append({**common, "tool": "mergekit: not installed", "seconds": None, "cpu_s": None,
                             "peak_rss_MB": None, "time_ratio": None, "cpu_ratio": None, "mem_ratio": None,
                             "max_abs_diff": None, "n_diff": None})
    notes = (f"3 float32 checkpoints of {per_model / 2**20:.1f} MB each (largest tensor {largest / 2**20:.1f} MB); "
             "ratios are against the naive baseline (time_ratio: wall clock, cpu_ratio: CPU seconds of the process, "
             "< 1: faster; mem_ratio < 1: less memory). "
             "bound_MB = (models + 2) x largest tensor, the streaming target. max_abs_diff / n_diff: labkit's "
             "output vs that tool's (largest difference, entries differing by more than 1e-6); against mergekit's "
             "ties the few differing entries are those whose |delta| ties exactly with the trim cut (both keep "
             "exactly k entries and break such ties differently). Peak RSS is the OS's resident set: labkit reads each "
             "tensor through safetensors.safe_open, memory-mapped but opened per tensor and copied once into float32, "
             "so only the tensors being merged are resident; "
             "safetensors.load_file copies whole files into memory; mergekit memory-maps its inputs, so the pages "
             "it touched count too although the OS could drop them. Time: fastest of "
             f"{repeat} fresh process(es), interleaved; on a shared CPU wall times vary by 2x between runs, CPU seconds "
             "much less, so compare cpu_ratio there.")
    if not mk_version:
        notes += " mergekit is not installed here, so no mergekit ratio is reported."
    return {"title": f"labkit merge vs whole-state-dict merging{' (smoke)' if smoke else ''}",
            "baseline": "naive: load every full state dict (safetensors.torch.load_file), merge in memory, save_file",
            "columns": ["method", "tool", "inputs_MB", "seconds", "cpu_s", "peak_rss_MB", "bound_MB", "time_ratio",
                        "cpu_ratio", "mem_ratio", "max_abs_diff", "n_diff"],
            "rows": rows, "notes": notes}
