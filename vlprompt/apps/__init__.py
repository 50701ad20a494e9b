"""Applications: the demo, the few-shot/transfer evaluation runner, the test-time tuning runner and
image classification with a saved prompt. They compose everything below them; nothing imports them."""
