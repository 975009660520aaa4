"""Scoring answers on standard benchmarks from their own local files.

- VQAv2 (`vqav2`): official annotations JSON + results JSON `[{"question_id", "answer"}]`; soft accuracy.
- GQA (`gqa`): balanced questions JSON `{qid: {"answer", ...}}` + `[{"questionId", "prediction"}]`; exact match.
- POPE (`pope`): question JSONL `{"question_id", "image", "text", "label"}` + answer JSONL `{"question_id", "text"}`;
  accuracy, precision, recall, F1 (positive = yes), yes-ratio.
- ScienceQA-IMG (`scienceqa`): problems JSON `{pid: {"choices", "answer", "image", "split"}}` + answer JSONL
  `{"question_id", "text"}`; multiple-choice accuracy over the problems with an image.
Prediction files in LLaVA's answer format (`{"question_id", "text"}` per line) are read for every benchmark.
"""
