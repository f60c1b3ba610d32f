"""Every scheduler name builds from a model's own scheduler config, per request, without side effects."""

import copy

import pytest
from diffusers import EulerDiscreteScheduler, PNDMScheduler

from sdcog.resolve.schedulers import SCHEDULER_NAMES, SCHEDULERS, build_scheduler
from sdcog_tools.random_pipelines import SD15_SCHEDULER

SD15_CONFIG = PNDMScheduler.from_config(SD15_SCHEDULER).config
SD2_V_CONFIG = EulerDiscreteScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
).config

CLASSIC_REPLICATE_NAMES = ["DDIM", "K_EULER", "DPMSolverMultistep", "K_EULER_ANCESTRAL", "PNDM", "KLMS"]


def test_classic_replicate_names_and_popular_samplers_are_offered():
    assert set(CLASSIC_REPLICATE_NAMES) <= set(SCHEDULER_NAMES)
    assert {"DPM++ 2M Karras", "UniPC", "DPM++ 2M SDE Karras", "Euler Karras"} <= set(SCHEDULER_NAMES)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_scheduler_builds_and_keeps_the_models_training_setup(name):
    base = copy.deepcopy(dict(SD2_V_CONFIG))
    scheduler = build_scheduler(name, SD2_V_CONFIG)
    assert type(scheduler).__name__ == SCHEDULERS[name].class_name
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    if "prediction_type" in scheduler.config:
        assert scheduler.config.prediction_type == "v_prediction"
    for option, value in SCHEDULERS[name].overrides.items():
        assert scheduler.config[option] == value
    scheduler.set_timesteps(10)
    assert dict(SD2_V_CONFIG) == base  # the shared config is untouched


def test_each_request_gets_its_own_scheduler_instance():
    first = build_scheduler("K_EULER", SD15_CONFIG)
    second = build_scheduler("K_EULER", SD15_CONFIG)
    first.set_timesteps(5)
    second.set_timesteps(40)
    assert first is not second and len(first.timesteps) == 5


def test_karras_variant_differs_from_the_plain_sampler():
    plain = build_scheduler("DPMSolverMultistep", SD15_CONFIG)
    karras = build_scheduler("DPM++ 2M Karras", SD15_CONFIG)
    plain.set_timesteps(20)
    karras.set_timesteps(20)
    assert karras.config.use_karras_sigmas and not plain.config.use_karras_sigmas
    assert karras.timesteps.tolist() != plain.timesteps.tolist()
