"""Plumbing shared by every gRPC service.

errors          domain exceptions (no grpc import); the caller-safe message travels as details
server          start_server / RunningServer / run: error interceptor, health, reflection, drain
channel         open_channel / wait_ready / health_status for clients of our services
tensor_codec    torch.Tensor <-> k2.v1.Tensor (raw bytes, checked against the receiver's config)
sampling_codec  k2.v1.SamplingParams / SampledToken <-> k2model types
"""
