from unitune.models.loader import LoadedModel, load_model, end_of_turn_ids

__all__ = ["LoadedModel", "load_model", "end_of_turn_ids"]
