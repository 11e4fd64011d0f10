"""Stateful stream processing (faust-streaming): metering windows and budgets."""
