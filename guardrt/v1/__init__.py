"""Generated gRPC/protobuf code for guardrt.v1 (scripts/gen_proto.sh; do not edit)."""
