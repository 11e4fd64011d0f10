from tensorrt_llm.executor.result import CompletionOutput, GenerationResult, RequestError

__all__ = ["CompletionOutput", "GenerationResult", "RequestError"]
