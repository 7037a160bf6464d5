"""The evaluation room: the validation engine (`evaluator`), COCO average precision (`coco`), the LUNA16 FROC (`froc`)
and the evaluation report (`report`)."""
