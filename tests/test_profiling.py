"""The per-stage time breakdown: exclusive sections that add up to the wall time."""

import time

import torch

from emoscope import profiling
from tiny import tiny_model


def test_nested_sections_are_exclusive_and_add_up_to_the_wall_time():
    with profiling.collect() as prof:
        with profiling.section("outer"):
            time.sleep(0.05)
            with profiling.section("inner"):
                time.sleep(0.1)
            time.sleep(0.05)
        time.sleep(0.05)
    assert abs(prof["outer"] - 0.1) < 0.05 and abs(prof["inner"] - 0.1) < 0.05
    assert abs(prof["other"] - 0.05) < 0.05


def test_a_failing_section_closes_and_an_enclosing_collect_keeps_the_inner_ones():
    with profiling.collect() as outer:
        with profiling.collect() as inner:
            try:
                with profiling.section("boom"):
                    time.sleep(0.02)
                    raise ValueError
            except ValueError:
                pass
        with profiling.section("after"):
            time.sleep(0.02)
    assert inner["boom"] >= 0.0 and "after" not in inner
    assert set(outer) >= {"boom", "after", "other"} and not profiling._stack


def test_every_forward_of_a_model_view_counts_as_llm_forward_even_the_base_model_alone():
    view = tiny_model(n_layers=2)
    ids = torch.randint(0, 100, (2, 16))
    with profiling.collect() as prof:
        for _ in range(20):
            view.model(input_ids=ids)
            view.model.base_model(input_ids=ids)
            view.logits_from_resid(torch.zeros(2, view.d_model), [1, 2])
    assert prof["llm_forward"] >= 0.01 and set(prof) == {"llm_forward", "other"}
    try:  # an exception inside the forward still closes the section
        view.model(input_ids=torch.full((1, 3), 10**6))
    except Exception:
        pass
    assert not profiling._stack


def test_a_kind_inside_a_finer_kind_of_the_same_work_counts_as_the_finer_one():
    with profiling.collect() as prof:
        with profiling.section("statistics:probes"):
            with profiling.section("statistics"):
                time.sleep(0.05)
            with profiling.section("io"):
                time.sleep(0.05)
    assert prof["statistics:probes"] >= 0.04 and "statistics" not in prof and prof["io"] >= 0.04
