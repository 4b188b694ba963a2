"""The cluster simulator: the real scheduler, RTC and JE routing policies on a virtual clock.

`events` (the discrete-event core), `te` (a simulated TE: real `Scheduler` + `RelationalTensorCache`, a
`SimRunner` in place of the model), `costmodel` (step time fitted to the real engine; `calibrate` fits it),
`workload` (the bench datasets with Poisson arrivals, trace replay), `simulation` (the JE and the run),
`report`, `plot`, `cli` (`deepflow sim run | calibrate`). Nothing here imports torch except `calibrate`.
"""
