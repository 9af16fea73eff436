"""Container images of the prediction service: built with podman, run on any container
platform (SageMaker's serving contract: `<image> serve`, port 8080, /ping, /invocations)."""
