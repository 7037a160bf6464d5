"""The evaluation room: the validation engine (`evaluator`), COCO average precision (`coco`), the IoU-based FROC
(`froc`), the official LUNA16 FROC/CPM scorer of submissions (`luna16_froc`) and the evaluation report (`report`)."""
