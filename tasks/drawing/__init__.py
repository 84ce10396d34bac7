"""Drawing: the study's overview figure (`figure`), the evaluation and aggregate plots (`evaluation`,
`aggregate`) and figures as Prefect artifacts the UI shows (`artifacts`)."""
