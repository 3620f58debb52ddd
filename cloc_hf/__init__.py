"""CLOC as a native Hugging Face model. ``import cloc_hf`` registers it with the Auto* classes."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_cloc import CLOCConfig, CLOCPrompterConfig, CLOCTextConfig, CLOCVisionConfig
from .image_processing_cloc import CLOCImageProcessor
from .modeling_cloc import (
    CLOCGroundingOutput,
    CLOCModel,
    CLOCOutput,
    CLOCPreTrainedModel,
    CLOCPrompter,
    CLOCVisionModel,
)
from .processing_cloc import CLOCProcessor
from .registry import create_model, get_model_config, list_models

__version__ = "0.1.0"


def _register() -> None:
    """Register configs/models in-process (needed for LLaVA sub-configs, which ignore ``auto_map``) and
    mark the classes so ``save_pretrained`` writes ``auto_map`` + code for ``trust_remote_code`` users."""
    for config_cls, model_cls in ((CLOCConfig, CLOCModel), (CLOCVisionConfig, CLOCVisionModel)):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
    AutoConfig.register(CLOCTextConfig.model_type, CLOCTextConfig, exist_ok=True)
    AutoConfig.register(CLOCPrompterConfig.model_type, CLOCPrompterConfig, exist_ok=True)
    for config_cls in (CLOCConfig, CLOCVisionConfig):
        AutoImageProcessor.register(config_cls, image_processor_classes={"pil": CLOCImageProcessor}, exist_ok=True)
    AutoProcessor.register(CLOCConfig, CLOCProcessor, exist_ok=True)
    for cls in (CLOCConfig, CLOCVisionConfig):
        cls.register_for_auto_class()
    for cls in (CLOCModel, CLOCVisionModel):
        cls.register_for_auto_class("AutoModel")
    # so a `trust_remote_code` user's AutoProcessor gets the processor (not only the tokenizer)
    CLOCProcessor.register_for_auto_class()
    CLOCImageProcessor.register_for_auto_class()


_register()

__all__ = [
    "CLOCConfig",
    "CLOCGroundingOutput",
    "CLOCImageProcessor",
    "CLOCModel",
    "CLOCOutput",
    "CLOCPreTrainedModel",
    "CLOCPrompter",
    "CLOCProcessor",
    "CLOCPrompterConfig",
    "CLOCTextConfig",
    "CLOCVisionConfig",
    "CLOCVisionModel",
    "create_model",
    "get_model_config",
    "list_models",
]
