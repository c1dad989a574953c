"""The model registry: slots, their engines' lifecycles and the memory budget they share."""

from llm_service.registry.lifecycle import ModelRegistry
from llm_service.registry.reconciler import EngineFactory
from llm_service.registry.slots import RegistryPolicy, Slot, SlotState

__all__ = ["EngineFactory", "ModelRegistry", "RegistryPolicy", "Slot", "SlotState"]
