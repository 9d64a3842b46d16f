"""The engine's call: evidence per candidate, the decision model, the answer space and its calls, the honest
out-of-fold scenarios, and an exported engine end to end on the bundled example (real records, kmer-nb)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_test_config

from idengine import layout as C
from idengine.data.prepared import read_prepared, read_unknown
from idengine.reference.decision import load_decision, segment_softmax
from idengine.reference.evidence import FEATURES, NOVEL_GENUS, NOVEL_SPECIES, SPECIES, ReferenceTaxa, build_options
from idengine.reference.evidence import ClassifierView
from idengine.reference.scenarios import KNOWN, NOVEL_GENUS as NG, NOVEL_SPECIES as NS, Visibility, \
    deal_rare_species, fill_answers, make_scenarios
from idengine.reference.space import OptionSpace, engine_calls

F = {name: i for i, name in enumerate(FEATURES)}


def _hand_hits():
    taxa = ReferenceTaxa.from_rows(np.array(["A a", "A a", "A b", "B c", "C d"], dtype=object),
                                   np.array(["A", "A", "A", "B", ""], dtype=object))
    ref = np.array([[0, 2, 1, 3], [3, -1, -1, -1], [-1, -1, -1, -1]])
    identity = np.array([[0.99, 0.97, 0.95, 0.90], [0.90, np.nan, np.nan, np.nan], [np.nan] * 4])
    return taxa, ref, identity, np.where(ref >= 0, 0.8, np.nan)


def test_evidence_by_hand():
    taxa, ref, identity, coverage = _hand_hits()
    cls = ClassifierView(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]),
                         np.array(["A a", "A b", "B c"], dtype=object))
    o = build_options(ref, identity, coverage, taxa, cls, None, max_species=8, classifier_top=2)
    rows = pd.DataFrame(o.features, columns=FEATURES).assign(q=o.query, kind=o.kind, name=o.name)
    a_a = rows[(rows.q == 0) & (rows.name == "A a")].iloc[0]
    assert a_a.sp_div == pytest.approx(0.01) and a_a.sp_div2 == pytest.approx(0.05)  # its two records: .99, .95
    assert a_a.sp_margin_species == pytest.approx(0.2)  # 10 x (0.99 - 0.97, the best OTHER species A b)
    assert a_a.sp_margin_genus == pytest.approx(0.9)   # 10 x (0.99 - 0.90, the best other genus B)
    assert a_a.sp_is_top == 1 and a_a.sp_cls_in == 1 and a_a.sp_cls_logp == pytest.approx(np.log(0.7))
    assert a_a.sp_log_records == pytest.approx(np.log1p(2))
    # Query 1 hit only B c; A a joins as the classifier's second choice, without a hit.
    q1 = rows[rows.q == 1]
    assert list(q1[q1.kind == SPECIES].name) == ["B c", "A a"] and q1[q1.name == "A a"].sp_has_hit.iloc[0] == 0
    assert set(q1[q1.kind == NOVEL_SPECIES].name) == {"A", "B"}
    # Query 2 aligns to nothing: classifier candidates, their genera, and "novel genus" with no identity.
    q2 = rows[rows.q == 2]
    assert (q2.ctx_has_hit == 0).all() and q2[q2.kind == NOVEL_GENUS].n_div.iloc[0] == 1.0
    assert (rows.groupby("q").kind.apply(lambda k: (k == NOVEL_GENUS).sum()) == 1).all()


def test_a_blind_classifier_view_drops_the_species_and_renormalises():
    taxa, ref, identity, coverage = _hand_hits()
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    names = np.array(["A a", "A b", "B c"], dtype=object)
    view = ClassifierView(probs, names, blind=np.array(["A a", None, "Nomen nudum"], dtype=object))
    np.testing.assert_allclose(view.probs, [[0.0, 2 / 3, 1 / 3], probs[1], probs[2]])  # softmax without class A a
    o = build_options(ref, identity, coverage, taxa, view, None, max_species=8, classifier_top=2)
    rows = pd.DataFrame(o.features, columns=FEATURES).assign(q=o.query, kind=o.kind, name=o.name)
    a_a = rows[(rows.q == 0) & (rows.name == "A a")].iloc[0]
    assert a_a.sp_cls_in == 0 and a_a.sp_cls_logp == 0  # as for a species that is not one of its classes
    assert rows[(rows.q == 0) & (rows.name == "A b")].sp_cls_logp.iloc[0] == pytest.approx(np.log(2 / 3))
    assert rows[(rows.q == 1) & (rows.name == "A a")].sp_cls_in.iloc[0] == 1  # other queries see every class


def test_each_rank_threshold_holds_for_the_calls_made_at_that_rank():
    """Pooled over all queries, the genus threshold would pass queries whose genus is mostly wrong, because the
    species calls (whose genus is right) fill the pool; chosen on the queries that reach the genus rank, the genus
    calls themselves reach the target precision."""
    from scipy import sparse

    from idengine.reference.space import rank_thresholds

    space = _space()
    easy = [[0.99, 0.01, 0, 0, 0, 0]] * 100                  # species A a, right
    hard = [[0.30, 0.30, 0.0, 0.0, 0.0, 0.40]] * 10          # genus A at 0.6; 5 are of genus A, 5 of none
    p = sparse.csr_array(np.array(easy + hard, dtype=float))
    truth = pd.DataFrame({"species": ["A a"] * 100 + [None] * 10, "genus": ["A"] * 105 + [None] * 5,
                          "family": ["F"] * 110, "is_novel": [False] * 100 + [True] * 10})
    choices = rank_thresholds(space, p, truth, 0.95)
    assert choices["species"].threshold == pytest.approx(0.99)
    # Pooled, genus >= 0.6 would be right for 105 of 110 queries (0.955): the hard ones would be called genus A.
    assert choices["genus"].threshold > 0.6
    calls = engine_calls(space, p, {r: c.threshold for r, c in choices.items()})
    assert (calls["call_rank"] == "genus").sum() == 0 and (calls["call_rank"] == "species").sum() == 100


def _space():
    taxonomy = pd.DataFrame({"species": ["A a", "A b", "B c"], "genus": ["A", "A", "B"], "family": ["F", "F", "F"]})
    return OptionSpace.from_taxonomy(taxonomy)


def test_answer_space_sums_novel_species_into_their_genus_and_calls_novel():
    space = _space()
    assert list(space.names()) == ["A a", "A b", "B c", None, None, None]
    from scipy import sparse

    p = sparse.csr_array(np.array([
        [0.96, 0.02, 0.01, 0.01, 0.0, 0.0],   # species A a
        [0.30, 0.20, 0.00, 0.48, 0.0, 0.02],  # genus A = 0.98 (half of it a novel species of A)
        [0.00, 0.00, 0.01, 0.00, 0.0, 0.99],  # a genus not in the reference: novel
        [0.30, 0.30, 0.30, 0.00, 0.0, 0.10],  # nothing reaches its threshold
    ]))
    thresholds = {"species": 0.9, "genus": 0.9, "family": 1.01, "novel": 0.9}
    calls = engine_calls(space, p, thresholds)
    assert calls["call"].tolist() == ["A a", "A", "novel", "unassigned"]
    assert calls["call_rank"].tolist() == ["species", "genus", "novel", "unassigned"]
    np.testing.assert_allclose(calls["p_novel_species"], [0.01, 0.50, 0.99, 0.10])
    np.testing.assert_allclose(calls["p_novel_genus"], [0.0, 0.02, 0.99, 0.10])


def test_closed_set_probabilities_tie_exactly_where_the_engine_gives_nothing():
    """PR-AUC ranks each species' probabilities across queries: species the engine gave nothing must tie exactly,
    or float noise in each row's sum decides their order (it moved PR-AUC by +-0.004 between two runs)."""
    from scipy import sparse

    from idengine.reference.assess import closed_set_probs

    space = _space()
    p = sparse.csr_array(np.array([[0.1 + 0.2, 0.7, 0.0, 0.0, 0.0, 0.0],      # sums to 1 + 1 ulp
                                   [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],            # all mass off the label space
                                   [0.6, 0.0, 0.0, 0.0, 0.3, 0.1]]))
    probs = closed_set_probs(space, p, np.array(["A a", "A b", "B c", "Z z"], dtype=object))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert probs[0, 2] == probs[0, 3] == probs[2, 1] == probs[2, 2] == probs[2, 3] > 0
    np.testing.assert_allclose(probs[1], 0.25)  # nothing on the label space: uniform
    assert probs[2, 0] == pytest.approx(1.0, abs=1e-6) and probs[0, 1] == pytest.approx(0.7, abs=1e-6)


def test_segment_softmax_is_a_softmax_per_query():
    query = np.array([0, 0, 1, 1, 1, 2])
    p = segment_softmax(np.array([1.0, 3.0, 0.0, 0.0, 50.0, -7.0]), query, 3)
    np.testing.assert_allclose(np.bincount(query, weights=p), 1.0)
    assert p[1] == pytest.approx(np.exp(3) / (np.exp(1) + np.exp(3))) and p[5] == 1.0


@pytest.fixture(scope="module")
def example_tables(prepared_example):
    records, labels = read_prepared(prepared_example)
    return records[records[C.FOLD] != C.TEST_FOLD], read_unknown(prepared_example), labels


def test_scenarios_hide_what_they_say_and_deal_each_rare_species_to_one_fold(example_tables):
    records, unknown, _ = example_tables
    scenarios = make_scenarios(records, unknown, novel_genus_share=0.3, seed=0)
    dealt = deal_rare_species(unknown, sorted(records[C.FOLD].unique(), key=int), 0)
    assert dealt.index.is_unique and set(dealt) <= set(records[C.FOLD])
    known = scenarios[scenarios.scenario == KNOWN]
    assert (known.exclude_fold == known.fold).all() and len(known) == len(records)
    novel = scenarios[scenarios.scenario == NS]
    assert (novel.exclude_species == novel.truth_species).all()
    assert (novel.fold == novel.truth_species.map(dealt)).all()  # a rare species' queries sit in its own fold
    genus_out = scenarios[scenarios.scenario == NG]
    assert (genus_out.exclude_genus == genus_out.truth_genus).all() and len(genus_out) > 0
    # Every rare record is a novel query of exactly one kind: species hidden, or its genus hidden.
    assert sorted(novel.record.tolist() + genus_out.record.tolist()) == sorted(unknown[C.ID])
    reference = pd.concat([records, unknown.assign(fold=None)], ignore_index=True)
    answered = fill_answers(scenarios, Visibility(reference))
    assert (answered.loc[answered.scenario == KNOWN, "answer"] == known.truth_species).all()
    assert set(answered.loc[answered.scenario == NG, "answer_kind"]) == {NOVEL_GENUS}


def test_thinned_queries_see_one_record_of_their_species_and_are_never_judged(example_tables):
    from idengine.reference.scenarios import KNOWN_RARE, THINNED, judged

    records, unknown, _ = example_tables
    scenarios = make_scenarios(records, unknown, novel_genus_share=0.3, seed=0, rare_balance=1.0)
    thin, rare = scenarios[scenarios.scenario == THINNED], (scenarios.scenario == KNOWN_RARE).sum()
    novel = scenarios.scenario.isin([NS, NG]).sum()
    assert 0 < len(thin) <= len(records)  # made up to balance the novel queries, one per kept record at most
    assert 0.8 * novel <= len(thin) + rare <= 1.2 * novel  # a seeded share: about as many as the novel queries
    kept = records.set_index(C.ID).loc[thin.keep_record]
    assert (kept[C.SPECIES].to_numpy() == thin.truth_species.to_numpy()).all()
    assert (kept[C.FOLD].astype(str).to_numpy() != thin.fold.to_numpy()).all()  # another fold's record
    assert (thin.exclude_species == thin.truth_species).all() and (thin.exclude_fold == thin.fold).all()
    assert not judged(scenarios)[thin.index].any() and judged(scenarios)[scenarios.scenario != THINNED].all()
    reference = pd.concat([records, unknown.assign(fold=None)], ignore_index=True)
    seen = Visibility(reference)
    q = thin.index.to_numpy()[:20]
    np.testing.assert_array_equal(seen.records(scenarios, q, scenarios.truth_species.to_numpy()[q]), 1.0)
    same = [np.flatnonzero(reference[C.SPECIES].to_numpy() == s)[:8] for s in scenarios.truth_species[q]]
    width = max(map(len, same))
    rows = np.array([np.pad(r, (0, width - len(r)), mode="edge") for r in same])
    visible = seen.rows_visible(scenarios, q, rows)
    np.testing.assert_array_equal(visible, reference[C.ID].to_numpy()[rows] == thin.keep_record.to_numpy()[:20, None])
    assert (make_scenarios(records, unknown, 0.3, 0, rare_balance=0.0).scenario != THINNED).all()


@pytest.fixture(scope="module")
def engine_run(prepared_example, tmp_path_factory):
    """cv + train of the bundled example with kmer-nb: its engine/ outputs and the exported artifact."""
    from idengine.recipes.cv import run_cv
    from idengine.recipes.train import train_final

    work = tmp_path_factory.mktemp("engine")
    config = tiny_test_config(work, "model.kind=kmer-nb")
    cv = run_cv(config, prepared_example, work / "cv")
    return config, cv, train_final(config, prepared_example, cv, work / "model")


@pytest.mark.integration
def test_nested_engine_metrics_and_honest_folds(engine_run, example_tables):
    from idengine.recipes.engine import read_engine

    _, cv, _ = engine_run
    metrics = json.loads((cv / C.METRICS_FILE).read_text())["engine"]
    scenarios, options, scores = read_engine(cv)
    assert set(scenarios.scenario) == {"known", "known_rare", "novel_species", "novel_genus"}  # none thinned
    assert len(metrics["folds"]) == 5 and metrics["untrainable_queries"] < 0.1 * len(scenarios)
    for key in ("top1_acc", "f1_macro", "pr_auc_macro", "ece", "known_called_species", "over_classification",
                "novel_genus_accuracy_top"):
        assert 0.0 <= metrics["engine"][key]["mean"] <= 1.0, key
    assert metrics["index"]["top1_acc"]["mean"] > 0.5
    assert scenarios["call_rank"].isin(["species", *C.RANKS, "novel", "unassigned"]).all()
    assert (scenarios["call_rank"] == "species").mean() > 0.5
    # The engine's out-of-fold probabilities of each query sum to 1 over its options.
    p = segment_softmax(scores, options.query, options.n_queries)
    np.testing.assert_allclose(np.bincount(options.query, weights=p), 1.0)
    # A known query is called its own species far more often than a wrong one.
    known = scenarios[(scenarios.scenario == "known") & (scenarios.call_rank == "species")]
    assert (known.call == known.truth_species).mean() > 0.85


@pytest.mark.integration
def test_thinned_queries_teach_the_scorer_and_are_never_judged(prepared_example, tmp_path):
    """engine.rare_balance=1 through cv and train: thinned queries are searched, fitted on, and never judged."""
    from idengine.recipes.cv import run_cv
    from idengine.recipes.engine import read_engine
    from idengine.recipes.train import final_decision
    from idengine.reference.scenarios import THINNED

    config = tiny_test_config(tmp_path, "model.kind=kmer-nb", "engine.rare_balance=1.0")
    cv = run_cv(config, prepared_example, tmp_path / "cv")
    scenarios, options, _ = read_engine(cv)
    thinned = (scenarios.scenario == THINNED).to_numpy()
    assert thinned.sum() > 10
    assert scenarios.loc[thinned, "call_rank"].isna().all() and scenarios.loc[~thinned, "call_rank"].notna().all()
    # Most thinned queries find their species' one kept record, so their answer is among the options.
    assert (scenarios.loc[thinned, "target_slot"] >= 0).mean() > 0.5
    metrics = json.loads((cv / C.METRICS_FILE).read_text())["engine"]
    assert metrics["queries"][THINNED] == thinned.sum() and 0 < metrics["engine"]["top1_acc"]["mean"] <= 1
    records, labels = read_prepared(prepared_example)
    from idengine.recipes.engine import reference_table

    reference = reference_table(records, read_unknown(prepared_example))
    decision, thresholds, _ = final_decision(config, cv, OptionSpace.from_taxonomy(reference), reference)
    assert decision.temperature > 0 and set(thresholds) >= {"species", "genus", "novel"}


@pytest.mark.integration
def test_exported_engine_calls_with_probabilities_and_nearest_reference(engine_run):
    from idengine.deploy.artifact import load_artifact, verify_artifact

    _, _, model = engine_run
    manifest = verify_artifact(model)
    assert {"engine/reference.parquet", "engine/decision.safetensors", "engine/engine.json",
            "classifier/kmer_model.safetensors"} <= set(manifest["files"])
    artifact = load_artifact(model)
    records = pd.read_parquet(model / "engine" / C.REFERENCE_FILE)
    sample = records.sample(20, random_state=0)
    calls = artifact.calls(sample[C.ID].tolist(), sample[C.SEQUENCE].tolist())
    # each reference record finds itself at 100% (or a tie: an identical record, or one contained in it, since
    # terminal gaps do not count, as in VSEARCH; ties go to the first reference row)
    assert (calls["nearest_identity"] == 1.0).all() and calls["nearest_id"].isin(records[C.ID]).all()
    assert ((calls["p_novel_species"] >= 0) & (calls["p_novel_species"] <= 1)).all()
    # the top species come from the sparse rows: best first, reference species, "" with 0 past a query's options
    names = calls[[f"top{j}_species" for j in range(1, 6)]].to_numpy()
    probs = calls[[f"top{j}_prob" for j in range(1, 6)]].to_numpy(dtype=float)
    assert (np.diff(probs, axis=1) <= 1e-12).all() and ((names == "") == (probs == 0)).all()
    assert set(names[names != ""]) <= set(records[C.SPECIES]) and (probs[:, 0] > 0).all()
    species_call = (calls["call_rank"] == "species").to_numpy()
    assert (calls["call"].to_numpy()[species_call] == names[species_call, 0]).all()
    # the most probable genus holds at least the top species' mass; a genus call names it
    genus_of = dict(zip(records[C.SPECIES], records["genus"]))
    assert (calls["top_genus_prob"] >= probs[:, 0] - 1e-9).all() and (calls["top_genus_prob"] <= 1 + 1e-9).all()
    assert (calls["top_genus"].to_numpy()[species_call] == [genus_of[n] for n in names[species_call, 0]]).all()
    genus_call = (calls["call_rank"] == "genus").to_numpy()
    assert (calls["call"].to_numpy()[genus_call] == calls["top_genus"].to_numpy()[genus_call]).all()
    n_species = records[C.SPECIES].nunique()  # asked for more top species than the reference has: one column each
    wide = artifact.calls(sample[C.ID].tolist()[:2], sample[C.SEQUENCE].tolist()[:2], top_k=n_species + 3)
    assert f"top{n_species}_species" in wide and f"top{n_species + 1}_species" not in wide
    nothing = artifact.calls(["q"], ["ACGT" * 30])  # a query that aligns to nothing
    assert nothing["call"].iloc[0] == nothing["call_rank"].iloc[0] == "unassigned"
    assert np.isnan(nothing["nearest_identity"].iloc[0]) and not nothing["nearest_id"].iloc[0]  # empty cells
    assert load_decision(model / "engine").temperature > 0


@pytest.mark.integration
def test_a_tampered_reference_is_refused_naming_the_file(engine_run, tmp_path):
    from idengine.deploy.artifact import load_artifact

    _, _, model = engine_run
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    with open(copy / "engine" / C.REFERENCE_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="engine/reference.parquet"):
        load_artifact(copy)


@pytest.mark.integration
def test_a_reference_without_a_genus_column_calls_species_or_novel(tmp_path):
    """labels.csv with only id and species: no genus to fall back to, so a call is a species, novel or unassigned."""
    from conftest import REPO
    from idengine.config_io import load_config
    from idengine.deploy.predict import predict_file
    from idengine.recipes.cv import run_cv
    from idengine.recipes.prepare import prepare_dataset
    from idengine.recipes.train import train_final

    example = REPO / "examples" / "12s-fish-mini"
    pd.read_csv(example / "labels.csv")[["id", "species"]].to_csv(tmp_path / "labels.csv", index=False)
    config = load_config(REPO / "jobs" / "configs" / "tiny-cpu.yaml", [
        f"data.sequences={example / 'sequences.fasta.gz'}", f"data.labels={tmp_path / 'labels.csv'}",
        "model.kind=kmer-nb", f"train.storage_path={tmp_path / 'ray'}"])
    prepared = prepare_dataset(config, tmp_path / "prepared")
    model = train_final(config, prepared, run_cv(config, prepared, tmp_path / "cv"), tmp_path / "model")
    calls = pd.read_csv(predict_file(model, example / "sequences.fasta.gz", tmp_path / "calls.csv", config.predict,
                                     use_ray=False), keep_default_na=False)
    assert len(calls) == 415 and set(calls["call_rank"]) <= {"species", "novel", "unassigned"}
    assert (calls["top_genus"].fillna("") == "").all() and (calls["top_genus_prob"] == 0).all()  # no genus
    assert (calls["call_rank"] == "species").mean() > 0.5
