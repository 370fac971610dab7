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

    steps = {(s["backbone"], s["mode"]): s for s in r.get("step", [])}
    lora, full = steps.get((bb, "lora")), steps.get((bb, "full"))
    if lora and full:
        def pct(s):
            return f"{100 * s['flops_per_s'] / peak:.1f}%" if peak else ""
        rows = [[m, _b(s["trainable_params"]), f"{s['step_s']:.2f}", _gflops(s["flops_per_step"]),
                 _gflops(s["flops_per_s"]), pct(s), _b(s["peak_rss_mib"]), _b(s["training_peak_mib"])]
                for m, s in (("LoRA r=8 q,v", lora), ("full fine-tuning", full))]
        lines += ["## Local step: LoRA vs full fine-tuning", "",
                  f"{bb}, one AdamW step on the same batch ({lora['tokens']} tokens), "
                  "median of the timed steps; FLOPs counted by torch's FlopCounterMode.", ""]
        lines += _table(["mode", "trainable params", "step s", "GFLOP/step", "GFLOP/s",
                         "% of matmul peak", "peak RSS MiB", "RSS added by training MiB"], rows)
        lines += [f"Full / LoRA: step time **{full['step_s'] / lora['step_s']:.2f}x**, peak RSS "
                  f"**{full['peak_rss_mib'] / lora['peak_rss_mib']:.2f}x**, memory added by "
                  f"training **{full['training_peak_mib'] / max(lora['training_peak_mib'], 1):.2f}x**.", ""]

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
