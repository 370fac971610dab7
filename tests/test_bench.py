"""The benchmark's byte accounting and report (its timings are never asserted)."""

from bench.measure import comm_bytes
from bench.report import markdown


def test_comm_bytes_count_exact_payloads_and_every_codec_saves(tmp_path):
    c = comm_bytes("tiny-gpt2", str(tmp_path))
    lora, full = c["fedavg_lora"], c["fedavg_full"]
    # float32 payloads: at least 4 bytes per value, plus Flower's headers
    assert full["uplink"] >= 4 * c["full_values"]
    assert lora["none"]["uplink"] >= 4 * c["adapter_values"]
    assert lora["none"]["uplink"] == lora["none"]["downlink"]
    assert c["lora_reduction_pct"] > 99.0
    assert lora["int8"]["uplink"] < lora["bf16"]["uplink"] < lora["none"]["uplink"]
    table = markdown({"size": "t", "params": {"backbone": "tiny-gpt2"}, "comm": [c],
                      "machine": {"cpus": 2, "load_avg_at_start": [0, 0, 0]}})
    assert f"{lora['int8']['uplink']:,}" in table and "fedavg-full" in table
