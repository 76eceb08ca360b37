"""Key geometry (`bench keys`): the reach α(q) is the solver's own shift, and it separates edits from the rest."""

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.diagnostics.geometry import energy_dims, key_geometry, reach
from editors.solvers import gram, solve_spd

REPO = Path(__file__).resolve().parents[2]


def test_reach_reproduces_the_normal_equation_shift():
    """S* q computed by the editor's solver equals D α(q) for any query: the push-through identity."""
    g = torch.Generator().manual_seed(0)
    k, d, q = (torch.randn(6, 20, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64),
               torch.randn(4, 20, generator=g, dtype=torch.float64))
    lam = 0.3
    shift = solve_spd(gram(k, lam), k.T @ d).T  # (d', d) as editors/meta.py builds it
    torch.testing.assert_close(q @ shift.T, reach(k, q, lam).T @ d, rtol=1e-9, atol=1e-9)


def test_reach_is_one_on_own_keys_and_zero_off_their_span():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(5, 30, generator=g, dtype=torch.float64)
    own = reach(k, k, 1e-8)
    torch.testing.assert_close(own, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    q = torch.randn(3, 30, generator=g, dtype=torch.float64)
    q -= (q @ torch.linalg.pinv(k)) @ k  # remove the component in the keys' span
    assert reach(k, q, 1e-8).abs().max() < 1e-6
    # a larger λ shrinks an edit key's share of its own shift
    assert reach(k, k, 10.0).diagonal().mean() < own.diagonal().mean()


def test_energy_dims_counts_the_rank():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(50, 3, generator=g) @ torch.randn(3, 40, generator=g)
    assert energy_dims(low, 0.999) <= 3
    assert energy_dims(torch.randn(200, 40, generator=g), 0.9) > 20
    assert energy_dims(torch.zeros(4, 4)) == 0


def test_key_geometry_on_tiny_gpt2(tiny_gpt2, synthetic_task):
    """Few edits: unrelated keys are reached far less than the edited prompts' own keys; many edits: not."""
    modules = tiny_gpt2.module_names(last_n=2)
    few = key_geometry(tiny_gpt2, synthetic_task.sample(4, 0), modules, [0.1])
    assert len(few) == len(modules)
    for r in few:
        assert r.self_coef > 0.9 and r.edit_reach > 0.9
        assert r.unrel_reach < 0.8 * r.edit_reach, r
        assert 0 < r.dims90 <= r.key_dim
    many = key_geometry(tiny_gpt2, synthetic_task.sample(64, 0), modules[-1:], [0.1])[0]
    assert many.unrel_reach > few[-1].unrel_reach


def test_bench_keys_cli(tiny_gpt2):
    r = CliRunner().invoke(app, ["keys", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4",
                                 "--last-n", "1", "--lam", "0.1,1", "--results", str(REPO / "results"), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output.strip().splitlines()[-1])
    assert [x["lam"] for x in rows] == [0.1, 1.0]
    assert rows[0]["module"].endswith("h.3.mlp.c_proj") and "h.3.mlp.c_proj" in r.output
    bad = CliRunner().invoke(app, ["keys", "--model", "tiny-gpt2", "--task", "synthetic", "--lam", "0"])
    assert bad.exit_code == 2 and "positive" in bad.output
    # task options reach the requests: neighbour probes are other prompts than the countries
    near = CliRunner().invoke(app, ["keys", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4",
                                    "--last-n", "1", "--lam", "0.1,1", "--results", str(REPO / "results"),
                                    "--set", "locality=neighbours", "--json"], catch_exceptions=False)
    assert near.exit_code == 0, near.output
    near_rows = json.loads(near.output.strip().splitlines()[-1])
    assert near_rows[0]["edit_reach"] == rows[0]["edit_reach"]
    assert near_rows[0]["unrel_reach"] != rows[0]["unrel_reach"]
    bad = CliRunner().invoke(app, ["keys", "--model", "tiny-gpt2", "--task", "synthetic", "--set", "nope=1"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_bench_keys_rejects_a_model_of_the_wrong_kind(tiny_gpt2):
    r = CliRunner().invoke(app, ["keys", "--model", "tiny-gpt2", "--task", "fever", "--edits", "2",
                                 "--results", str(REPO / "results")])
    assert r.exit_code == 2 and "needs a classifier" in r.output
