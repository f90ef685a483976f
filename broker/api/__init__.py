"""The thin gRPC and HTTP layer: servicers, converters, caller authentication and the status map.

The only product package (with `broker.app` and `broker.cli`) that imports gRPC or the generated code."""
