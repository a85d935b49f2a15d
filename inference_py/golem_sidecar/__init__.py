"""golem's Python sidecar: keeps base models resident with PEFT adapters attached and answers
ExamService calls over gRPC."""
