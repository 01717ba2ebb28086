from unitune.models.loader import LoadedModel, end_of_turn_ids, load_model

__all__ = ["LoadedModel", "load_model", "end_of_turn_ids", "image_kind", "saved_kind"]


def image_kind(kind: str):
    """The module that loads and saves a model kind that sees images (None for the text kinds)."""
    from unitune.models import detection, vision

    return {"image-cls": vision, "detection": detection}.get(kind)


def saved_kind(path):
    """The image kind's module a folder was saved by (a run's model/ or adapter/), else None."""
    from unitune.models import vision

    for kind in ("image-cls", "detection"):
        if vision.saved_info(path, kind) is not None:
            return image_kind(kind)
    return None
