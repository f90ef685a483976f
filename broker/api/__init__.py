"""The thin gRPC layer: servicers, converters, caller authentication and the status map."""
