"""The two tiers of tests (tests/conftest.py): a test's tier follows from its fixtures, and the fast tier refuses
what would make it slow, so a slow test cannot land there unnoticed."""

import multiprocessing
import os
import subprocess

import pytest
from conftest import SlowTierOnly


def test_in_the_fast_tier_a_process_or_model_weights_fail_the_test_and_name_the_fixture(request):
    assert request.node.get_closest_marker("slow") is None
    from transformers import Qwen2ForCausalLM

    with pytest.raises(SlowTierOnly, match=r"test_tiers.py::.*starts a process .*the `processes` fixture"):
        subprocess.run(["true"], check=True)
    with pytest.raises(SlowTierOnly, match=r"starts a process"):
        multiprocessing.get_context("spawn").Process(target=print).start()
    with pytest.raises(SlowTierOnly, match=r"loads model weights .*the `weights` fixture"):
        Qwen2ForCausalLM.from_pretrained("any/model")


def test_a_test_that_declares_processes_is_in_the_slow_tier_and_may_start_them(request, processes):
    assert request.node.get_closest_marker("slow") is not None
    assert subprocess.run(["true"]).returncode == 0


def test_a_test_given_a_model_is_in_the_slow_tier(request, tiny_random):
    assert request.node.get_closest_marker("slow") is not None


def test_make_tests_workers_each_get_cores_of_their_own():
    from conftest import worker_cores

    assert [worker_cores([0, 1], w, 2) for w in (0, 1)] == [[0], [1]]
    assert [worker_cores(list(range(5)), w, 2) for w in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert worker_cores([3], 1, 2) == [3]  # one core: shared
    if os.environ.get("PYTEST_XDIST_WORKER") and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        assert len(os.sched_getaffinity(0)) < (os.cpu_count() or 1) or os.cpu_count() == 1  # pinned, under make test
