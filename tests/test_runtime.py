import pytest
import torch

from pixrun.runtime import (
    bf16_is_fast,
    close_world,
    compute_context,
    cpu_has_amx,
    init_world,
    resolve_device,
    uses_bf16,
)

CPU = torch.device("cpu")


def test_amx_comes_from_the_public_cpu_feature_table_and_yields_to_onednns_cap(monkeypatch):
    """If a torch upgrade renames the table's key, CPUs with AMX would silently lose bf16 autocast: fail first."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert "amx_tile" in torch.cpu.get_capabilities()
    assert cpu_has_amx() == torch.cpu.get_capabilities()["amx_tile"] == bf16_is_fast(CPU)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_tile": True})
    assert cpu_has_amx()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not cpu_has_amx() and not uses_bf16(CPU, "auto")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")
    assert cpu_has_amx()


def test_precision_settings():
    assert uses_bf16(CPU, "bf16") and not uses_bf16(CPU, "fp32")
    assert uses_bf16(CPU, "auto") == bf16_is_fast(CPU)
    assert not bf16_is_fast(torch.device("meta"))


@pytest.mark.parametrize("precision, autocast", [("bf16", True), ("fp32", False)])
def test_compute_context_autocasts_as_asked_and_uses_the_math_attention_kernel_on_cpu(precision, autocast):
    a = torch.randn(4, 4)
    with compute_context(CPU, precision):
        assert (a @ a).dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.flash_sdp_enabled()


def test_resolve_device():
    assert resolve_device("cpu") == CPU and resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_process_without_torchrun_is_rank_0_of_1_and_joins_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world, device = init_world("cpu")
    assert (world.rank, world.size, world.is_main, world.distributed, device) == (0, 1, True, False, CPU)
    assert world.share_slice(5) == (slice(0, 5), 5) and not torch.distributed.is_initialized()
    close_world(world)
