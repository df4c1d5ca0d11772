"""scripts/bench's arithmetic (percentiles, roofline) and its reading of each peer's
stream, on data shaped as each server sends it; no server or model is started."""
from __future__ import annotations

import json
import math

import pytest
import torch
from aiohttp import web
from safetensors.torch import save_file

from scripts import bench
from scripts.benchkit import report, roofline
from scripts.benchkit.loads import Load, parse_loads, run_round
from scripts.benchkit.sse import StreamError, parse_data_line, record
from scripts.benchkit.stats import RoundResult, StreamTiming, percentile, ratios, summarize
from scripts.benchkit.systems import llama_cpp, loraxd_daemon, transformers_peft, vllm_cpu


def sse(chunk) -> bytes:
    return b"data: " + (chunk if isinstance(chunk, bytes) else json.dumps(chunk).encode()) + b"\n"


def text_chunk(text, finish=None, **extra):
    return {"object": "text_completion", "choices": [
        {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}], **extra}


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

# llama-server: a chunk per token, then a final one with no text, its usage and timings.
LLAMA = [text_chunk(" a"), text_chunk(" b"), text_chunk(" c"),
         text_chunk("", "length", usage=USAGE, timings={"predicted_n": 3})]
# vLLM: the last token's chunk carries the finish; usage alone in a chunk with no choices.
VLLM = [text_chunk(" a", usage=None), text_chunk(" b", usage=None),
        text_chunk(" c", "length", usage=None), {"choices": [], "usage": USAGE}]
# loraxd: the same, the finish in a chunk of its own.
LORAXD = [text_chunk(" a"), text_chunk(" b"), text_chunk(" c"), text_chunk("", "length"),
          {"choices": [], "usage": USAGE}]


@pytest.mark.parametrize("chunks", [LLAMA, VLLM, LORAXD], ids=["llama.cpp", "vLLM", "loraxd"])
def test_each_peers_stream_gives_one_arrival_per_token(chunks):
    timing = StreamTiming(sent=0.0)
    lines = [b": keep-alive\n", b"\n"] + [sse(c) for c in chunks] + [sse(b"[DONE]"), b"\n"]
    for t, line in enumerate(lines):
        record(timing, line, float(t))
    assert len(timing.arrivals) == 3 and timing.num_tokens == 3
    assert timing.ttft == timing.arrivals[0] > 0


def test_a_stream_without_usage_counts_its_chunks_and_an_error_chunk_fails():
    timing = StreamTiming(sent=1.0)
    for t, c in enumerate([text_chunk("x"), text_chunk("y", "length")]):
        record(timing, sse(c), 2.0 + t)
    assert timing.num_tokens == 2 and timing.gaps() == [1.0]
    assert parse_data_line(b"event: ping") is None
    with pytest.raises(StreamError, match="overloaded"):
        parse_data_line(sse({"error": {"message": "overloaded"}}))


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_summarize_takes_the_median_round_and_pools_latencies():
    def stream(sent, *arrivals):
        return StreamTiming(sent, list(arrivals), len(arrivals))
    rounds = [RoundResult([stream(0.0, 0.1, 0.2, 0.3), stream(0.0, 0.2, 0.4, 0.6)], wall_s=0.6),
              RoundResult([stream(0.0, 0.1, 0.2, 0.3)] * 2, wall_s=0.3),
              RoundResult([stream(0.0, 0.5, 0.6, 0.7)] * 2, wall_s=1.2)]
    row = summarize(rounds)
    assert row["tok_s"] == 10.0  # rounds of 10, 20 and 5 tok/s
    assert row["ttft_ms_p50"] == pytest.approx(150.0)  # 6 TTFTs: 100 x3, 200, 500 x2
    assert row["ttft_ms_p99"] == pytest.approx(500.0)
    assert row["itl_ms_p50"] == pytest.approx(100.0)  # 12 gaps, 2 of them 200 ms
    assert row["itl_ms_p99"] == pytest.approx(200.0)
    peer = {**row, "tok_s": 5.0, "itl_ms_p50": 200.0}
    r = ratios(row, peer)
    assert r == pytest.approx({"tok_s": 2.0, "ttft_ms_p50": 1.0, "ttft_ms_p99": 1.0,
                               "itl_ms_p50": 0.5, "itl_ms_p99": 1.0})


def test_roofline_counts_the_distinct_adapters_of_a_step():
    base = roofline.roofline(21e9, 538_000_000, batch=8)
    assert base["max_steps_s"] == pytest.approx(21e9 / 538e6)
    assert base["max_tok_s"] == pytest.approx(8 * 21e9 / 538e6)
    mixed = roofline.roofline(21e9, 538_000_000, batch=64, adapters=8,
                              bytes_per_adapter=19_500_000)
    assert mixed["distinct_adapters"] == 8 and mixed["step_bytes"] == 538e6 + 8 * 19.5e6
    assert mixed["max_tok_s"] == pytest.approx(64 * 21e9 / (538e6 + 156e6))
    assert roofline.roofline(1e9, 100, batch=4, adapters=8, bytes_per_adapter=10)[
        "step_bytes"] == 140  # only 4 streams: at most 4 of the 8 adapters in a step


def test_roofline_is_the_lower_of_the_memory_and_the_compute_bound():
    # 538 MB of fp32 weights: 134.5 M weights, 269 MFLOP per token; 150 GFLOP/s: 558 tok/s
    small = roofline.roofline(21e9, 538_000_000, batch=8, flops=150e9)
    assert small["bound"] == "memory" and small["max_tok_s"] == pytest.approx(8 * 21e9 / 538e6)
    assert small["compute_tok_s"] == pytest.approx(150e9 / 269e6)
    big = roofline.roofline(21e9, 538_000_000, batch=32, flops=150e9)
    assert big["bound"] == "compute" and big["max_tok_s"] == pytest.approx(150e9 / 269e6)
    assert big["max_steps_s"] == pytest.approx(big["max_tok_s"] / 32)
    # a token's adapter adds its own FLOPs; bf16 weights are 2 bytes each
    mixed = roofline.roofline(21e9, 538_000_000, batch=64, adapters=8,
                              bytes_per_adapter=19_500_000, flops=150e9)
    assert mixed["flops_per_token"] == pytest.approx(2 * (538e6 + 19.5e6) / 4)
    half = roofline.roofline(21e9, 269_000_000, batch=64, flops=150e9, itemsize=2)
    assert half["flops_per_token"] == pytest.approx(269e6)


def test_weight_bytes_read_from_safetensors_headers(tmp_path):
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, tmp_path / "model-1.safetensors")
    save_file({"c": torch.zeros(2, 2, dtype=torch.bfloat16)}, tmp_path / "model-2.safetensors")
    assert roofline.weight_bytes(tmp_path, "float32") == (12 + 5 + 4) * 4
    assert roofline.weight_bytes(tmp_path, "bfloat16") == (12 + 5 + 4) * 2
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"A": torch.zeros(16, 576), "B": torch.zeros(576, 16)},
              adapter / "adapter_model.safetensors")
    assert roofline.adapter_bytes(adapter, "float32") == 2 * 16 * 576 * 4
    smollm2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
               "num_key_value_heads": 3}
    assert roofline.kv_bytes_per_token(smollm2, "float32") == 30 * 2 * 3 * 64 * 4


def test_bandwidth_is_measured():
    assert roofline.read_bandwidth(threads=1, repeats=2) > 1e8


def test_loads_parse_and_spread_streams_over_adapters():
    loads = parse_loads("8:base, 32:lora", num_adapters=8)
    assert loads == [Load(8, 0), Load(32, 8)]
    assert [loads[1].adapter_of(i) for i in (0, 7, 8, 31)] == [0, 7, 0, 7]
    assert loads[0].adapter_of(3) is None and loads[1].key == "32:lora"
    for bad in ("8", "x:base", "0:base", "8:peft"):
        with pytest.raises(ValueError):
            parse_loads(bad, 8)


def test_servers_with_fixed_slots_restart_per_stream_count():
    loads = parse_loads("8:base,8:lora,64:base", 8)
    assert bench.server_groups(llama_cpp, loads) == [(8, loads[:2]), (64, loads[2:])]
    for module in (loraxd_daemon, vllm_cpu, transformers_peft):
        assert bench.server_groups(module, loads) == [(64, loads)]


def test_request_bodies_name_the_adapter_each_peer_s_way():
    common = {"prompt": "p", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    names = ["a0", "a1"]
    assert loraxd_daemon.LoraxdSystem("u", names).body("p", 1, 64) == {**common, "model": "a1"}
    assert loraxd_daemon.LoraxdSystem("u", names).body("p", None, 64)["model"] == ""
    assert vllm_cpu.VllmSystem("u", names).body("p", None, 64)["model"] == vllm_cpu.BASE_NAME
    llama = llama_cpp.LlamaCppSystem("u", [5, 6])
    assert llama.body("p", 1, 64)["lora"] == [{"id": 6, "scale": 1.0}]
    assert llama.body("p", None, 64)["lora"] == []  # the global scales, all set to 0


def test_llama_adapter_ids_and_tokenizer_copy(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    listed = [{"id": 0, "path": str(b), "scale": 1.0}, {"id": 1, "path": str(a), "scale": 1.0}]
    assert llama_cpp.adapter_ids_by_path(listed, [a, b]) == [1, 0]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    assert llama_cpp._model_source(model, tmp_path / "copy") == model
    (model / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}')
    copy = llama_cpp._model_source(model, tmp_path / "copy")
    assert json.loads((copy / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert (copy / "config.json").resolve() == (model / "config.json").resolve()


def test_report_shares_of_roofline_and_ratios():
    loads = [Load(8, 0), Load(8, 8)]
    roof = {"bandwidth_gb_s": 20.0, "bandwidth_repeats": 10, "weight_bytes": 500_000_000,
            "adapter_bytes": 20_000_000, "kv_bytes_per_token": 46080,
            "loads": {"8:base": roofline.roofline(20e9, 500_000_000, 8),
                      "8:lora": roofline.roofline(20e9, 500_000_000, 8, 8, 20_000_000)}}
    row = {"tok_s": 160.0, "ttft_ms_p50": 50.0, "ttft_ms_p99": 80.0, "itl_ms_p50": 40.0,
           "itl_ms_p99": 60.0}
    results = {"loraxd": {"8:base": dict(row), "8:lora": dict(row)},
               "llama.cpp": {"8:base": {**row, "tok_s": 80.0}}}
    machine = report.machine_info(2, "64 new tokens")
    probes = {"loraxd": ["x", "a", "b"], "llama.cpp": ["x", "a", "c"]}
    doc = report.build(machine, roof, results, {"vLLM": "no vLLM"}, loads, probes)
    assert doc["probe_agreement"] == {"llama.cpp": "2 of 3"}
    assert doc["results"]["loraxd"]["8:base"]["roofline_share"] == pytest.approx(0.5)
    assert doc["results"]["loraxd"]["8:lora"]["roofline_share"] == pytest.approx(0.66)
    assert doc["ratios"]["loraxd/llama.cpp"] == {"8:base": pytest.approx(
        {"tok_s": 2.0, "ttft_ms_p50": 1.0, "ttft_ms_p99": 1.0, "itl_ms_p50": 1.0,
         "itl_ms_p99": 1.0})}
    text = report.render(doc)
    assert "| 8 streams, base | llama.cpp | 80.0 |" in text
    assert "| 8 streams, base | loraxd/llama.cpp | 2.00 |" in text
    assert "skipped vLLM: no vLLM" in text and "20.0 GB/s" in text
    assert "equal to loraxd's: 2 of 3" in text
    json.dumps(doc)
    cpuinfo = "processor : 0\nmodel name : Xeon X\nflags : fpu avx2 fma avx512f amx_bf16\n"
    assert report.cpu_model_name(cpuinfo) == "Xeon X"
    assert report.cpu_features(cpuinfo) == ["avx2", "fma", "avx512f", "amx_bf16"]


def test_the_roofline_takes_the_better_sample_of_the_machine(tmp_path, monkeypatch):
    """Sampled at the run's start and end: a slow moment at one of them (a shared machine)
    must not lower the roofline below what the systems reach."""
    monkeypatch.setattr(roofline, "weight_bytes", lambda *a: 500_000_000)
    monkeypatch.setattr(roofline, "kv_bytes_per_token", lambda *a: 46080)
    monkeypatch.setattr(bench.artifacts, "model_config", lambda *a: {})
    ctx = type("Ctx", (), {"model_dir": tmp_path, "dtype": "float32", "adapter_names": []})()
    roof = bench.measure_roofline(ctx, [Load(8, 0)], 10, [(16e9, 250e9), (24e9, 240e9)])
    assert roof["bandwidth_gb_s"] == 24.0 and roof["matmul_gflop_s"] == 250.0
    assert roof["loads"]["8:base"]["memory_tok_s"] == pytest.approx(24e9 / 500e6 * 8)
    assert roof["bandwidth_samples_gb_s"] == [16.0, 24.0]
    doc = report.build(report.machine_info(2, "w"), roof, {}, {}, [Load(8, 0)], {})
    assert "the better of the run's start and end: 16.0 and 24.0 GB/s): 24.0 GB/s" in \
        report.render(doc)


async def test_a_round_over_a_server_that_closes_each_connection(unused_tcp_port):
    """llama-server's way: every stream's connection closed after `[DONE]`."""
    async def completions(request):
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Connection": "close"})
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            await resp.write(sse(text_chunk(f" t{i}")) + b"\n")
        await resp.write(sse(text_chunk("", "length", usage={
            "completion_tokens": body["max_tokens"]})) + b"\n" + sse(b"[DONE]") + b"\n")
        resp.force_close()
        return resp
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        system = llama_cpp.LlamaCppSystem(f"http://127.0.0.1:{unused_tcp_port}", [0, 1])
        for _ in range(2):  # a second round reuses nothing of the first
            result = await run_round(system, Load(4, 2), new_tokens=5)
            assert [s.num_tokens for s in result.streams] == [5] * 4
            assert all(len(s.arrivals) == 5 for s in result.streams)
        with pytest.raises(RuntimeError, match="expected 6 tokens"):
            await run_round(_Short(system.url), Load(2, 0), new_tokens=6)
    finally:
        await runner.cleanup()


class _Short:
    """Asks for fewer tokens than the round expects, as a server that stopped at EOS."""

    def __init__(self, url):
        self.url = url

    def body(self, prompt, adapter, new_tokens):
        return {"prompt": prompt, "max_tokens": new_tokens - 1}


def test_precisions_become_more_loraxd_systems_of_the_run():
    args = bench.parse_args(["--precisions", "bfloat16, int8-weight-only+bfloat16"])
    bf16, both = args.precision_systems
    assert (bf16.NAME, bf16.dtype, bf16.extra) == ("loraxd bfloat16", "bfloat16", ())
    assert (both.dtype, both.extra) == ("bfloat16", ("--quantize", "int8-weight-only"))
    assert bench.parse_args([]).precision_systems == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--precisions", "bfloat16+float32"])


def test_a_precision_system_s_share_is_of_the_bytes_it_reads(tmp_path, monkeypatch):
    """bf16 reads half the fp32 weights and adapters, int8 a quarter of the weights and the
    adapters in the model dtype: their shares of the roofline are of those bytes."""
    monkeypatch.setattr(roofline, "weight_bytes", lambda *a: 500_000_000)
    monkeypatch.setattr(roofline, "adapter_bytes", lambda *a: 20_000_000)
    monkeypatch.setattr(roofline, "kv_bytes_per_token", lambda *a: 46080)
    monkeypatch.setattr(bench.artifacts, "model_config", lambda *a: {})
    ctx = type("Ctx", (), {"model_dir": tmp_path, "dtype": "float32", "adapter_names": ["a"],
                           "adapter_dirs": lambda self: [tmp_path]})()
    bf16, int8 = bench.parse_args(["--precisions", "bfloat16,int8-weight-only"]
                                  ).precision_systems
    loads = [Load(8, 0), Load(8, 8)]
    roof = bench.measure_roofline(ctx, loads, 10, [(20e9, 250e9)], [bf16, int8])
    own = roof["systems"]
    assert (own[bf16.NAME]["weight_bytes"], own[bf16.NAME]["adapter_bytes"]) == (
        250_000_000, 10_000_000)
    assert (own[int8.NAME]["weight_bytes"], own[int8.NAME]["adapter_bytes"]) == (
        125_000_000, 20_000_000)
    assert own[int8.NAME]["loads"]["8:lora"]["max_tok_s"] == pytest.approx(20e9 / 285e6 * 8)
    row = {"tok_s": 320.0, "ttft_ms_p50": 1.0, "ttft_ms_p99": 1.0, "itl_ms_p50": 1.0,
           "itl_ms_p99": 1.0}
    results = {"loraxd": {"8:base": dict(row)}, bf16.NAME: {"8:base": dict(row)},
               int8.NAME: {"8:base": dict(row)}}
    doc = report.build(report.machine_info(2, "w"), roof, results, {}, loads, {})
    shares = {s: doc["results"][s]["8:base"]["roofline_share"] for s in results}
    assert shares == {"loraxd": pytest.approx(1.0), bf16.NAME: pytest.approx(0.5),
                      int8.NAME: pytest.approx(0.25)}
    assert "loraxd int8-weight-only reads weights 125.0 MB, each adapter 20.0 MB" in \
        report.render(doc)
