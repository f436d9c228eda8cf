"""zoo: sequence models beyond attention behind one block contract.

``import zoo`` registers the ``zoo`` model type with the transformers Auto classes, so exported checkpoints load
with ``AutoModelForCausalLM.from_pretrained(dir)``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from zoo.config import ModelConfig, Recipe
from zoo.errors import ConfigError, ZooError
from zoo.modeling import ZooCache, ZooConfig, ZooForCausalLM, ZooForMaskedLM, ZooModel
from zoo.recipe_loader import load_recipe

AutoConfig.register(ZooConfig.model_type, ZooConfig, exist_ok=True)
AutoModel.register(ZooConfig, ZooModel, exist_ok=True)
AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)
AutoModelForMaskedLM.register(ZooConfig, ZooForMaskedLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "ModelConfig", "Recipe", "ZooCache", "ZooConfig", "ZooError", "ZooForCausalLM", "ZooForMaskedLM", "ZooModel", "load_recipe",
]
