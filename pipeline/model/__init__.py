"""The model: where a checkpoint is (checkpoint) and how it is loaded (loading, families), model
inputs from the HF processor (preprocess), the engine that generates (engine, vision), a replica
across several devices (tensor_parallel), and how a batch is split so failures cost few rows
(batching, failures)."""
