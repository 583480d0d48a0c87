"""Few-step distillation methods (DMD2, f-distill, LADD, LCM); documentation/DISTILLATION.md."""
