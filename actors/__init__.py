"""Ray and vLLM plumbing (model actors, pools, the vLLM engine actor). Only this package imports ray/vllm."""
