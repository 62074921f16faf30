"""Training: `CompressionTrainer` (a `transformers.Trainer`) and what only it uses: numerical health checks, the
per-step device-side log, progress lines, checkpoint checks, distillation (with the fast frozen teacher) and PEFT
(LoRA) recovery. Methods never import from here except the log window they write into (`device_logs`)."""
