"""What a new user finds without reading the code: `dynatune ls` lists the run options with their
help and where each cached model lives; `dynatune estimate` ends with the device it prices for and
a one-line summary of what fits."""
from dynatune.assets import asset_path
from dynatune.cli import main, run_options
from dynatune.planner import estimate, format_table


def test_ls_lists_run_options_and_model_locations(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    opts = {k: (d, h) for k, d, h in run_options()}
    for key in ("lr", "epochs", "max_steps", "data.train", "data.messages", "data.max_train", "eval_steps",
                "early_stopping_patience", "load_best", "log_every", "report_to", "gradient_checkpointing",
                "precision"):
        assert key in opts and opts[key][1], key
        assert f"  {key}=" in out, key
    assert opts["max_steps"][0] == -1 and opts["data.text"][0] == "text" and opts["report_to"][0] == "none"
    line = next(x for x in out.splitlines() if x.startswith("  lr="))
    assert line.split(None, 1)[1] == opts["lr"][1]                 # the help text, as the dataclass says it
    # each cached model: where it lives (a directory from_pretrained loads)
    assert f"at {asset_path('minilm-l6')}" in out
    assert f"at {asset_path('smollm2-135m') / 'hf'}" in out


def test_estimate_ends_with_device_and_what_fits(capsys):
    args = ["model=arch:tiny-llama", "batch_size=4", "seq_len=32", "budget=0.8", "device_type=cpu",
            "families=top,lisa,lora", "lora_ranks=2,8,64"]
    rows = estimate(args)
    fits = {r["config"]: r["fits"] for r in rows}
    top_k = max(r["setting"] for r in rows if r["family"] == "top" and r["fits"])
    lisa = [r["setting"] for r in rows if r["family"] == "lisa" and r["fits"]]
    lora = [r["setting"] for r in rows if r["family"] == "lora" and r["fits"]]
    expected = (f"full {'yes' if fits['full'] else 'no'}; top-k up to k={top_k} of 4; "
                + (f"LISA up to k={max(lisa)} of 4" if lisa else "LISA no") + "; "
                + (f"LoRA up to r={max(lora)}" if lora else "LoRA no") + "; "
                + ("TriMS yes" if fits["top1"] else "TriMS no (its start, the top block, does not fit)"))
    assert not fits["full"] and fits["top1"]  # 80% of full fine-tuning: full cannot fit, one block can
    last = format_table(rows).splitlines()[-2:]
    assert last[0].startswith("priced for the CPU (no cuBLAS workspaces")
    assert last[1].split(": ", 1)[1] == expected
    assert main(["estimate", *args]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == last[1]
    # without a budget it says how to ask
    no_budget = format_table(estimate([a for a in args if not a.startswith("budget=")])).splitlines()
    assert no_budget[-2].startswith("priced for the CPU") and no_budget[-1].startswith("fits: no budget given")


def test_estimate_summary_names_dynalora_by_where_it_fits():
    """DynaLoRA's part of the summary: the largest k whose worst placement fits ("anywhere"), else the
    largest that fits in the top blocks, else no; the rows decide, the line repeats them."""
    args = ["model=arch:tiny-llama", "batch_size=4", "seq_len=32", "device_type=cpu", "families=top,dynalora",
            "dynalora_r=4"]
    rows = estimate(args)
    worst = {r["setting"]: r["predicted_peak_bytes"] for r in rows if r["family"] == "dynalora"}
    top = {r["setting"]: r["predicted_peak_bytes"] for r in rows if r["family"] == "dynalora-top"}
    # a budget between the k=3 worst placement and the k=3 top placement: only the top blocks fit
    budget = (worst[3] + top[3]) // 2
    line = format_table(estimate(args + [f"budget={budget}B", "margin=0"])).splitlines()[-1]
    fits_top = max(k for k, b in top.items() if b <= budget)
    assert line.endswith(f"DynaLoRA up to k={fits_top} of 8 in the top blocks; TriMS yes"), line
    line = format_table(estimate(args + [f"budget={max(worst.values())}B", "margin=0"])).splitlines()[-1]
    assert "DynaLoRA up to k=8 of 8 anywhere" in line


def test_estimate_prices_spsft_as_a_run_of_it_is_priced_and_names_the_largest_r_that_fits():
    """The spsft rows are the prices a run's tuner gives the same method (real weights, selected rows)
    byte for byte, grow with r only by W_f, its gradient and its state, and the summary names the
    largest r under the budget."""
    from dynatune.engine import Tuner
    from dynatune.memory import MemoryModel
    from dynatune.methods import build_method
    from dynatune.models import load_model

    args = ["model=arch:tiny-llama", "batch_size=4", "seq_len=32", "device_type=cpu", "families=top,spsft",
            "spsft_ranks=2,4,8"]
    rows = {r["setting"]: r for r in estimate(args) if r["family"] == "spsft"}
    for r, row in rows.items():
        model, _ = load_model("arch:tiny-llama", "causal-lm", seed=0)
        t = Tuner(model, build_method("spsft", r=r, importance="l2"))
        mm = MemoryModel.from_tuner(t, batch_shape=(4, 32), device_type="cpu")
        pred = mm.predict(t.method.largest_plan(t.units))
        assert (row["predicted_peak_bytes"], row["trainable_params"]) == (pred.predicted_peak_bytes, pred.trainable_params)
        assert row["terms"]["activations"] == rows[2]["terms"]["activations"]  # x once per linear, whatever r
        t.close_hooks()
    budget = (rows[4]["predicted_peak_bytes"] + rows[8]["predicted_peak_bytes"]) // 2
    line = format_table(estimate(args + [f"budget={budget}B", "margin=0"])).splitlines()[-1]
    assert "SPSFT up to r=4 rows per linear" in line
