"""The trainer's publishing entry points: `CompressionTrainer.save_model` and `push_to_hub` after the search.
They hand the run's `CompressionRecord` to publishing and drive the Trainer's own Hub machinery (repo creation,
push callbacks)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging

from ..publishing.publish import compression_report, normalized_card_info, publication_files, upload_folder
from ..publishing.saving import CONTROL_DIR, save_atomically

logger = logging.get_logger(__name__)


def _trainer_files(trainer, compressed, repo_id: str | None, model_name: str) -> dict[str, str]:
    report = compression_report(trainer, compressed)
    processor = trainer.processing_class
    if processor is None:
        logger.warning("CompressionTrainer: no processing_class, so no image processor is saved with the compressed "
                       "model and pipeline() cannot load it; pass processing_class=AutoImageProcessor.from_pretrained"
                       "(<source model>) (or hf_vit_compress.data.image_processor_for_transform(eval_transform)).")
    return publication_files(report, trainer.method.export_architecture().to_dict(), processor,
                             repo_id=repo_id, model_name=model_name)


def save_trainer_model(trainer, output_dir: str | os.PathLike) -> Path:
    """`CompressionTrainer.save_model` after the search: export (every rank), write (main process only)."""
    output_dir = Path(output_dir)
    compressed = trainer.export_compressed_model()
    if trainer.args.should_save:
        files = _trainer_files(trainer, compressed, repo_id=None, model_name=output_dir.name)
        save_atomically(compressed, output_dir, extra_files=files)
    return output_dir


def push_trainer_model(trainer, commit_message: str | None = "End of training", blocking: bool = True,
                       token: str | None = None, revision: str | None = None, private: bool | None = None,
                       **card_info):
    """`CompressionTrainer.push_to_hub`: the compressed model, staged in a temporary folder, to
    `args.hub_model_id` (Trainer's rules: created if needed, `hub_token`, `hub_private_repo`, `hub_revision`)."""
    if not trainer.method.search_finished:
        raise ValueError("CompressionTrainer.push_to_hub uploads the compressed model, which exists once the search "
                         "has finished: call it after train() (or after finalize_architecture())")
    trainer.model_card_info.update(normalized_card_info(card_info, "CompressionTrainer.push_to_hub"))
    trainer.callback_handler.on_push_begin(trainer.args, trainer.state, trainer.control)
    token = token if token is not None else trainer.args.hub_token
    if trainer.hub_model_id is None:
        trainer.init_hf_repo(token=token, private=private)  # Trainer's: hub_model_id or output_dir's name
    if not trainer.is_world_process_zero():
        return None
    compressed = trainer.export_compressed_model()
    repo_id = trainer.hub_model_id
    model_name = trainer.model_card_info.get("model_name") or repo_id.split("/")[-1]
    staging = Path(tempfile.mkdtemp(prefix="hf_vit_compress-push-"))
    try:
        files = _trainer_files(trainer, compressed, repo_id=repo_id, model_name=model_name)
        folder = save_atomically(compressed, staging / model_name, extra_files=files)
        shutil.rmtree(folder / CONTROL_DIR, ignore_errors=True)  # the save's own bookkeeping, not for the Hub
        trainer._finish_current_push()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return upload_folder(folder, repo_id, token=token, revision=revision if revision is not None
                         else trainer.args.hub_revision, commit_message=commit_message, run_as_future=not blocking,
                         create_repo=False, cleanup=staging)


__all__ = ["push_trainer_model", "save_trainer_model"]
