"""The parts of the examples that compute figures the README reports: the Best-of-N estimator and ARGS-style
guidance. (The examples themselves need SmolLM2 and are run by hand; see README.)"""

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from .helpers import count_good_words, tiny_value_model, word_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
bench_quality = pytest.importorskip("bench_quality")
common = pytest.importorskip("common")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_best_of_n_is_the_mean_best_over_every_subset(n):
    rewards = torch.randn(3, 6)
    estimate = bench_quality.best_of_n(rewards, n)
    for row in range(3):
        subsets = [max(subset) for subset in itertools.combinations(rewards[row].tolist(), n)]
        assert estimate[row].item() == pytest.approx(sum(subsets) / len(subsets), abs=1e-5)


def test_args_style_adds_the_weighted_centred_reward_of_each_candidate_text():
    tokenizer = word_tokenizer()
    input_ids = tokenizer(["w5 w11", "w30 w40"], return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    scores = torch.randn(2, len(tokenizer))
    scores[:, [11, 12, 50]] += 10.0  # two good words and a neutral one among the top 4
    out = bench_quality.ArgsStyle(tokenizer, count_good_words, weight=3.0, top_k=4)(input_ids, scores)
    top_scores, candidates = scores.topk(4, dim=-1)
    for row in range(2):
        text = tokenizer.decode(input_ids[row], skip_special_tokens=True)
        rewards = torch.tensor(count_good_words(
            [""] * 4, [f"{text} {tokenizer.convert_ids_to_tokens(int(c))}" for c in candidates[row]]))
        assert rewards.max() - rewards.min() == 1  # candidates differ: the check below is not vacuous
        expected = top_scores[row] + 3.0 * (rewards - rewards.mean())
        assert torch.allclose(out[row, candidates[row]], expected)
        others = torch.ones(scores.shape[-1], dtype=torch.bool)
        others[candidates[row]] = False
        assert torch.equal(out[row, others], scores[row, others])  # outside the top k: the base's scores


def test_gain_ratio_interpolates_best_of_n_linearly_in_sqrt_kl():
    results = [dict(method="Best-of-N", kl=0.0, reward=0.1), dict(method="Best-of-N", kl=1.0, reward=0.5),
               dict(method="Best-of-N", kl=4.0, reward=0.6), dict(method="VAS", kl=0.5, reward=0.9)]
    curve = bench_quality.best_of_n_curve(results)
    assert curve == [(0.0, 0.1), (1.0, 0.5), (4.0, 0.6)]
    # At KL 0.25 (sqrt 0.5) Best-of-N gives 0.3 (a chord in KL would give 0.2): a gain of 0.1 over the base's 0.1
    # is half of Best-of-N's 0.2.
    assert bench_quality.gain_ratio(0.2, 0.25, curve) == pytest.approx(0.5)
    assert bench_quality.gain_ratio(0.55, 2.25, curve) == pytest.approx(0.45 / 0.45)
    assert bench_quality.gain_ratio(0.9, 4.5, curve) is None  # past the largest N: nothing to compare with
    # A curve of the first-order form a + b·sqrt(KL) is read exactly between any two of its points.
    exact = [(kl, 0.1 + 0.3 * kl ** 0.5) for kl in (0.0, 0.3, 1.7, 3.1)]
    for kl in (0.1, 0.9, 2.4):
        assert bench_quality.reward_at_kl(exact, kl) == pytest.approx(0.1 + 0.3 * kl ** 0.5)


def test_baselines_reuse_an_earlier_run_but_the_methods_run_again(tmp_path):
    rows = [bench_quality.Result("Best-of-N", f"N={n}", 0.1 * n, 0.01, 0.2 * n, n, n, n, kl_kind="formula")
            for n in (1, 2)]
    rows += [bench_quality.Result("VAS scalar", "β=2", 0.3, 0.02, 0.5, 1.0, 2.8, 1.2, gain_ratio=0.5),
             bench_quality.Result("ARGS", "w=4", 0.25, 0.02, 0.4, 1.0, 1.0, 0.9)]
    (tmp_path / "quality.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows]))  # as write_results
    kept = bench_quality.load_baselines(tmp_path / "quality.json", names=["VAS scalar"])
    assert [(r.method, r.setting) for r in kept] == [("Best-of-N", "N=1"), ("Best-of-N", "N=2"), ("ARGS", "w=4")]
    assert kept[0] == rows[0]  # read back whole, kl_kind and extra included
    assert len(bench_quality.load_baselines(tmp_path / "quality.json", names=["VAS other"])) == 4
    # ARGS depends only on its weight: re-running other weights keeps the stored one, re-running it replaces it
    assert bench_quality.args_setting(4.0) == "w=4"  # as the stored results files spell their ARGS rows
    kept = bench_quality.load_baselines(tmp_path / "quality.json", names=[], args_settings=["w=8"])
    assert ("ARGS", "w=4") in [(r.method, r.setting) for r in kept]
    kept = bench_quality.load_baselines(tmp_path / "quality.json", names=[], args_settings=["w=4", "w=8"])
    assert "ARGS" not in [r.method for r in kept]
    assert bench_quality.load_baselines(None, names=[]) == []
    (tmp_path / "no_best_of.json").write_text('[{"method": "ARGS", "setting": "w=4", "reward": 0.2, '
                                              '"reward_se": 0.0, "kl": 0.4, "forward_tokens": 1, "compute": 1, '
                                              '"wall": 1}]')
    with pytest.raises(SystemExit, match="no Best-of-N"):
        bench_quality.load_baselines(tmp_path / "no_best_of.json", names=[])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match="--baselines"):
        bench_quality.load_baselines(tmp_path / "broken.json", names=[])


def test_value_models_entries_name_one_model_or_an_ensemble(tmp_path):
    assert bench_quality.parse_value_model("x=a/b") == ("x", [Path("a/b")])
    assert bench_quality.parse_value_model("ens=a,b/c") == ("ens", [Path("a"), Path("b/c")])
    for bad in ["a/b", "=a", "x=", "x=a,,b"]:
        with pytest.raises(SystemExit, match="NAME=PATH"):
            bench_quality.parse_value_model(bad)
    for name, metadata in [("raw", {}), ("standardised", dict(reward_mean=0.1, reward_std=0.5)),
                           ("standardised2", dict(reward_mean=0.0, reward_std=2.0))]:
        tiny_value_model("llama", **metadata).save_pretrained(tmp_path / name)
    members = bench_quality.load_ensemble("ens", [tmp_path / "standardised", tmp_path / "standardised2"])
    assert [member.config.reward_std for member in members] == [0.5, 2.0]
    with pytest.raises(SystemExit, match="mixes standardised and raw"):
        bench_quality.load_ensemble("ens", [tmp_path / "raw", tmp_path / "standardised"])
    with pytest.raises(SystemExit, match="No value model at"):
        bench_quality.load_ensemble("ens", [tmp_path / "standardised", tmp_path / "missing"])


def _row(method, setting, per_prompt_reward, per_prompt_kl):
    reward, kl = per_prompt_reward.mean().item(), per_prompt_kl.mean().item()
    return bench_quality.Result(method, setting, reward, 0.0, kl, 1.0, 1.0, 1.0, extra=dict(
        per_prompt_reward=per_prompt_reward.tolist(), per_prompt_kl=per_prompt_kl.tolist()))


def test_difference_to_args_at_equal_kl_interpolates_the_curve_and_pairs_the_prompts():
    generator = torch.Generator().manual_seed(0)
    prompts = 64
    prompt_level = torch.randn(prompts, generator=generator, dtype=torch.float64)  # shared by every method
    kl = torch.full((prompts,), 1.0, dtype=torch.float64)
    noise = lambda: 0.05 * torch.randn(prompts, generator=generator, dtype=torch.float64)  # noqa: E731
    # ARGS's curve: reward = level + 0.2 · sqrt(KL) at KL 0.25 and 4; the method sits 0.1 above it at KL 2.25.
    reference = [_row("ARGS", "w=2", prompt_level + 0.1 + noise(), 0.25 * kl),
                 _row("ARGS", "w=8", prompt_level + 0.4 + noise(), 4.0 * kl)]
    row = _row("VAS x", "β=2", prompt_level + 0.3 + 0.1 + noise(), 2.25 * kl)
    estimate, error = bench_quality.difference_at_equal_kl(row, reference)
    expected = row.reward - (reference[0].reward + (1.5 - 0.5) / 1.5 * (reference[1].reward - reference[0].reward))
    assert estimate == pytest.approx(expected)
    assert estimate == pytest.approx(0.1, abs=0.03)
    # Paired: the prompts' own spread (std 1) cancels; unpaired errors would be about 1 / sqrt(64) = 0.125.
    assert error < 0.02
    assert bench_quality.difference_at_equal_kl(_row("VAS x", "β=9", prompt_level, 5.0 * kl), reference) is None
    older = bench_quality.Result("ARGS", "w=4", 0.2, 0.0, 1.0, 1.0, 1.0, 1.0)  # from a JSON before per-prompt figures
    assert bench_quality.difference_at_equal_kl(row, [reference[0], older]) is None
    with pytest.raises(ValueError, match="different numbers of prompts"):
        bench_quality.difference_at_equal_kl(_row("VAS x", "β=2", prompt_level[:32], kl[:32]), reference)


def test_compare_reads_stored_and_new_rows_by_one_rule():
    generator = torch.Generator().manual_seed(1)
    prompt_level = torch.randn(16, generator=generator, dtype=torch.float64)
    kl = torch.ones(16, dtype=torch.float64)
    results = [bench_quality.Result("Best-of-N", f"N={n}", reward, 0.0, bound, n, n, n, kl_kind="formula")
               for n, reward, bound in [(1, 0.1, 0.0), (2, 0.3, 0.19), (4, 0.5, 0.64), (8, 0.6, 1.2)]]
    results += [_row("ARGS", "w=2", prompt_level + 0.2, 0.25 * kl), _row("ARGS", "w=4", prompt_level + 0.4, kl)]
    stored = _row("VAS x", "β=2", prompt_level + 0.35, 0.5625 * kl)  # sqrt 0.75: ARGS's chord gives +0.3
    stored.vs_args, stored.gain_ratio = [9.0, 9.0], 9.0  # figures a stored row kept from an older rule
    results.append(stored)
    bench_quality.compare(results)
    assert stored.vs_args[0] == pytest.approx(0.05)
    best_of = 0.3 + (0.5 - 0.3) * (0.75 - 0.19 ** 0.5) / (0.8 - 0.19 ** 0.5)  # between N=2 and N=4, in sqrt(KL)
    assert stored.gain_ratio == pytest.approx((stored.reward - 0.1) / (best_of - 0.1))
    assert results[0].gain_ratio is None and results[4].gain_ratio is not None


def test_merged_runs_average_each_prompt_and_resample_the_shared_prompts_once(tmp_path):
    generator = torch.Generator().manual_seed(2)
    prompt_level = torch.randn(32, generator=generator, dtype=torch.float64)
    kl = torch.ones(32, dtype=torch.float64)

    def run(offset, noise):
        return [bench_quality.Result("Best-of-N", "N=1", 0.1, 0.0, 0.0, 1, 1, 1, kl_kind="formula"),
                _row("ARGS", "w=2", prompt_level, 0.25 * kl), _row("ARGS", "w=4", prompt_level + 0.4, 2.25 * kl),
                _row("VAS e", "β=4", prompt_level + 0.2 + offset + noise, kl),
                bench_quality.Result("VAS old", "β=2", 0.3, 0.0, 1.0, 1.0, 1.0, 1.0)]  # no per-prompt figures

    noise = 0.05 * torch.randn(32, generator=generator, dtype=torch.float64)
    first, second = run(0.01, noise), run(0.03, -noise)
    merged = bench_quality.merge_runs([first, second])
    assert [(r.method, r.setting) for r in merged] == [("ARGS", "w=2"), ("ARGS", "w=4"), ("VAS e", "β=4")]
    assert merged[2].vs_args[0] == pytest.approx(0.02)  # ARGS at sqrt(KL) 1 is +0.2; the two runs' noise cancels
    assert merged[2].vs_args[1] == pytest.approx(0.0, abs=1e-12)
    # The same run twice is no more evidence than once: the error must not shrink by sqrt(2) as if independent.
    alone = bench_quality.merge_runs([first])[2].vs_args
    twice = bench_quality.merge_runs([first, first])[2].vs_args
    assert alone[1] > 0.005 and twice == pytest.approx(alone)
    for name, rows in [("a", first), ("b", second)]:
        (tmp_path / f"{name}.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    table = bench_quality.pooled_table([tmp_path / "a.json", tmp_path / "b.json"])
    each = [0.01 + noise.mean().item(), 0.03 - noise.mean().item()]  # each run read alone
    assert table.splitlines()[2].startswith("| VAS e β=4 | {:+.3f} ± 0.0".format(each[0]))
    assert "| {:+.3f} ± 0.0".format(each[1]) in table and "**+0.020 ± 0.000 @ 1.00**" in table


def _future_part_records(q, r, probs, noise_std, rollouts, generator):
    """bench_future_part records: candidates' returns drawn as Q + Gaussian noise."""
    returns = q[..., None] + noise_std * torch.randn(*q.shape, rollouts, generator=generator, dtype=torch.float64)
    return [dict(probs=probs[i].tolist(), immediate=r[i].tolist(), returns=returns[i].tolist())
            for i in range(q.shape[0])]


def test_future_part_statistics_remove_the_rollouts_noise_and_measure_steering_efficiency():
    bench_future_part = pytest.importorskip("bench_future_part")
    generator = torch.Generator().manual_seed(0)
    states, k = 4000, 4
    r = 0.06 * torch.randn(states, k, generator=generator, dtype=torch.float64)
    future = 0.05 * torch.randn(states, k, generator=generator, dtype=torch.float64)  # independent of r
    probs = torch.rand(states, k, generator=generator, dtype=torch.float64) + 0.1
    records = _future_part_records(r + future, r, probs, noise_std=0.3, rollouts=16, generator=generator)
    moments = [bench_future_part.state_moments(record) for record in records]
    result = bench_future_part.efficiencies(moments)
    w = probs / probs.sum(-1, keepdim=True)

    def weighted_var(x):
        return float((w * (x - (w * x).sum(-1, keepdim=True)) ** 2).sum(-1).mean())

    true_q, true_r = weighted_var(r + future), weighted_var(r)
    assert result["std_q"] == pytest.approx(true_q ** 0.5, rel=0.05)
    assert result["std_r"] == pytest.approx(true_r ** 0.5, rel=1e-9)
    naive = sum(m["qq"] for m in moments) / len(moments)  # uncorrected: the noise (0.3 / 4 per mean) dominates
    assert naive ** 0.5 > 1.3 * true_q ** 0.5
    assert result["eff_r"] == pytest.approx((true_r / true_q) ** 0.5, rel=0.05)  # corr(r + f, r), f independent
    # a value model that knows the future part exactly: its correlation with the noisy f̂ is corrected back to 1
    knowing = [dict(record, value=future[i].tolist()) for i, record in enumerate(records)]
    scored = bench_future_part.efficiencies([bench_future_part.state_moments(record) for record in knowing])
    assert scored["corr_v_f"] == pytest.approx(1.0, abs=0.05)
    assert scored["eff_v"] == pytest.approx(((true_q - true_r) / true_q) ** 0.5, rel=0.05)
    # a future part proportional to the immediate reward leaves ARGS-style fully efficient
    exact = _future_part_records(2.5 * r, r, probs, noise_std=0.0, rollouts=2, generator=generator)
    proportional = bench_future_part.efficiencies([bench_future_part.state_moments(rec) for rec in exact])
    assert proportional["eff_r"] == pytest.approx(1.0, abs=1e-9)
    assert proportional["std_f"] == pytest.approx(1.5 * true_r ** 0.5, rel=1e-6)


def test_the_plot_takes_more_methods_than_it_has_colours(tmp_path):
    methods = [f"VAS model{i}" for i in range(15)]
    styles = bench_quality.plot_styles(methods)
    assert list(styles) == methods
    assert len(set(styles.values())) == 15  # past the 11 colours, still one style per method
    assert len({colour for colour, _ in list(styles.values())[:11]}) == 11
    pytest.importorskip("matplotlib")  # the whole plot, where the examples' extras are installed
    rows = [bench_quality.Result(f"VAS model{i}", "β=2", 0.1 * i, 0.01, 0.2 * i, 1.0, 1.5, 1.2) for i in range(15)]
    bench_quality.write_results(rows, tmp_path, "many", "15 methods")
    assert (tmp_path / "many.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "many.json").read_text())) == 15


def test_value_agreement_correlates_within_state_contrasts_only():
    value_agreement = pytest.importorskip("value_agreement")
    generator = torch.Generator().manual_seed(2)
    states = []
    for _ in range(50):
        a = torch.randn(6, generator=generator)
        shift = 10 * torch.randn((), generator=generator)  # a per-state offset: no contrast, must not count
        states.append(dict(w=torch.rand(6, generator=generator).add(0.1).tolist(), a=a.tolist(),
                           same=(2 * a + shift).tolist(), opposite=(-a).tolist(),
                           other=torch.randn(6, generator=generator).tolist()))
    correlations = value_agreement.contrast_correlations(states)
    assert correlations["a"]["same"] == pytest.approx(1.0)
    assert correlations["a"]["opposite"] == pytest.approx(-1.0)
    assert abs(correlations["a"]["other"]) < 0.2
    assert correlations["other"]["a"] == pytest.approx(correlations["a"]["other"])


def test_benchmark_prompts_come_from_the_held_out_split_or_a_file_and_bad_counts_name_the_argument(tmp_path):
    assert bench_quality.benchmark_prompts(None, None) == common.movie_prompts()[320:]
    assert len(bench_quality.benchmark_prompts(None, None)) == 64
    openings = tmp_path / "openings.txt"
    openings.write_text("A film that\nNever has a\nThe best of\n")
    assert bench_quality.benchmark_prompts(openings, 2) == ["A film that", "Never has a"]
    with pytest.raises(ValueError, match="prompts must be between 1 and 3"):
        bench_quality.benchmark_prompts(openings, 4)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="openings=.*empty.txt"):
        bench_quality.benchmark_prompts(tmp_path / "empty.txt", None)


def test_fresh_openings_skip_excluded_and_repeated_ones_and_short_snippets():
    draw_openings = pytest.importorskip("data.draw_openings").draw_openings
    snippets = [f"Opening number {i} of a snippet long enough to count here" for i in range(20)]
    snippets += ["Too short to be drawn at all"] * 50 + [snippets[0]] * 30  # one opening, many snippets
    drawn = draw_openings(snippets, exclude=["Opening number 3 of"], count=19, seed=0)
    assert sorted(drawn) == sorted({" ".join(s.split()[:4]) for s in snippets[:20]} - {"Opening number 3 of"})
    assert drawn == draw_openings(snippets, exclude=["Opening number 3 of"], count=19, seed=0)
    assert drawn != draw_openings(snippets, exclude=["Opening number 3 of"], count=19, seed=1)
    shipped = (Path(__file__).resolve().parents[1] / "examples/data/fresh_prompts.txt").read_text().splitlines()
    assert len(set(shipped)) == len(shipped) == 256
    assert not set(shipped) & set(common.movie_prompts())  # none of the first file's openings
    with pytest.raises(ValueError, match="count=20: only 19 new openings"):
        draw_openings(snippets, exclude=["Opening number 3 of"], count=20, seed=0)


def test_rows_of_other_openings_are_neither_reused_as_baselines_nor_merged(tmp_path):
    prompts = ["A film that", "Never has a"]
    other = bench_quality.openings_digest(prompts)
    assert other != bench_quality.openings_digest(prompts[::-1])  # order matters: figures are paired by index
    held_out = bench_quality.openings_digest(bench_quality.benchmark_prompts(None, None))
    per_prompt = dict(per_prompt_reward=[0.1, 0.2], per_prompt_kl=[1.0, 1.0])
    legacy = [bench_quality.Result("Best-of-N", "N=1", 0.1, 0.0, 0.0, 1, 1, 1, kl_kind="formula"),
              bench_quality.Result("ARGS", "w=4", 0.15, 0.0, 1.0, 1, 1, 1, extra=dict(per_prompt))]  # no fingerprint
    fresh = [legacy[0], dataclasses.replace(legacy[1], extra=dict(per_prompt, openings=other))]
    for name, rows in [("legacy", legacy), ("fresh", fresh)]:
        (tmp_path / f"{name}.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    # Rows written before --openings existed are of the 64 held-out openings.
    assert len(bench_quality.load_baselines(tmp_path / "legacy.json", names=[], openings=held_out)) == 2
    with pytest.raises(SystemExit, match="legacy.json: its rows are of other prompts"):
        bench_quality.load_baselines(tmp_path / "legacy.json", names=[], openings=other)
    assert len(bench_quality.load_baselines(tmp_path / "fresh.json", names=[], openings=other)) == 2
    with pytest.raises(SystemExit, match="fresh.json: its rows are of other prompts"):
        bench_quality.load_baselines(tmp_path / "fresh.json", names=[], openings=held_out)
    assert bench_quality.merge_runs([fresh, fresh])[0].extra["openings"] == other
    with pytest.raises(ValueError, match="runs of different prompts"):
        bench_quality.merge_runs([legacy, fresh])
    with pytest.raises(SystemExit, match="--pool .*legacy.json .*fresh.json: runs of different prompts"):
        bench_quality.pooled_table([tmp_path / "legacy.json", tmp_path / "fresh.json"])
