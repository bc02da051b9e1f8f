"""SageMaker: deploy catalog models to endpoints, invoke and delete them, train and tune remotely.

Every module here imports boto3 and sagemaker inside its functions, so the CLI starts fast.
"""
