"""The experiments a study spec may name: each section's config class and job, and the settings a section fixes."""

from __future__ import annotations

from study.experiments.asr import AsrConfig, AsrJob
from study.experiments.base import Job, ModelConfig
from study.experiments.joint import JointConfig, JointJob
from study.experiments.sahara import GeneralizedShipsJob, SaharaConfig, SaharaJob
from study.experiments.ships import ShipsConfig, ShipsJob, SpecificityConfig, SpecificityJob
from study.experiments.surgery import SurgeryConfig, SurgeryJob
from study.experiments.swap import SwapConfig, SwapJob
from study.experiments.utility import UtilityConfig, UtilityJob

EXPERIMENTS: dict[str, type[ModelConfig]] = {
    "ships": ShipsConfig, "specificity": SpecificityConfig, "generalized_ships": SaharaConfig,
    "sahara": SaharaConfig, "joint": JointConfig, "asr": AsrConfig, "swap": SwapConfig, "utility": UtilityConfig,
    "surgery": SurgeryConfig}
JOBS: dict[str, type[Job]] = {
    "ships": ShipsJob, "specificity": SpecificityJob, "generalized_ships": GeneralizedShipsJob, "sahara": SaharaJob,
    "joint": JointJob, "asr": AsrJob, "swap": SwapJob, "utility": UtilityJob, "surgery": SurgeryJob}
# generalized Ships is Sahara's first step, every head scored; perplexity reads raw text, not a prompt
FIXED = {"generalized_ships": {"steps": 1}, "utility": {"format": "direct", "system_prompt": None}}
# keys of the study's defaults a section does not take: its own prompt set (benign prompts, benign text) and its
# limit; the joint search's steps (optimisation steps, not Sahara's group size); surgery's eps (1e-10, the
# paper's saved checkpoint, not the scoring eps the defaults set)
NOT_INHERITED: dict[str, frozenset[str]] = {"specificity": frozenset({"prompts", "limit"}),
                                            "joint": frozenset({"steps"}),
                                            "utility": frozenset({"prompts", "limit"}),
                                            "surgery": frozenset({"eps"})}
