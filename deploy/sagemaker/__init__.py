"""SageMaker, the studio's managed cloud: ``control`` (endpoints: create, autoscale, describe, list,
delete), ``runtime`` (invoking them) and ``training`` (training jobs), each a thin, tested layer over
boto3 that the ``sagemaker`` backend composes. Nothing here imports webapp; clients are built the
ordinary way, so the standard AWS environment (credentials, region, ``AWS_ENDPOINT_URL*``) decides
where they talk to.
"""
