"""The experiments a study spec may name: each section's config class, and the settings a section fixes."""

from __future__ import annotations

from study.experiments.asr import AsrConfig
from study.experiments.base import ModelConfig
from study.experiments.sahara import SaharaConfig
from study.experiments.ships import ShipsConfig, SpecificityConfig
from study.experiments.surgery import SurgeryConfig
from study.experiments.swap import SwapConfig
from study.experiments.utility import UtilityConfig

EXPERIMENTS: dict[str, type[ModelConfig]] = {
    "ships": ShipsConfig, "specificity": SpecificityConfig, "generalized_ships": SaharaConfig,
    "sahara": SaharaConfig, "asr": AsrConfig, "swap": SwapConfig, "utility": UtilityConfig,
    "surgery": SurgeryConfig}
# generalized Ships is Sahara's first step, every head scored; perplexity reads raw text, not a prompt
FIXED = {"generalized_ships": {"steps": 1}, "utility": {"format": "direct", "system_prompt": None}}
# sections whose own prompt set (benign prompts, benign text) and its limit the study's defaults do not replace
OWN_PROMPTS = ("specificity", "utility")
