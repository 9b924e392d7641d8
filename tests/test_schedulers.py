"""Schedule types (modules/sd_schedulers.py): AUTOMATIC1111 1.10's sigmas, lookup, and discarding the next-to-last.

EXPECTED holds the sigmas of every schedule type for 10 and 30 steps on the SD 1.x training schedule
(scaled_linear, beta 0.00085..0.012, 1000 steps), computed once by a separate throw-away numpy script that
re-implements the formulas of AUTOMATIC1111 1.10's `modules/sd_schedulers.py` (uniform, sgm_uniform,
get_align_your_steps_sigmas, kl_optimal, simple_scheduler, normal_scheduler, ddim_scheduler, beta_scheduler
with A1111's default Beta(0.6, 0.6)) and k-diffusion's `sampling.get_sigmas_karras`, `get_sigmas_exponential`,
`get_sigmas_polyexponential` and `external.DiscreteSchedule` (`get_sigmas`, `sigma_to_t`, `t_to_sigma`), in
float64, not with this project's code.
"""
from __future__ import annotations

import pytest
import torch

from modules import sd_samplers, sd_schedulers
from modules.errors import InvalidParameter
from modules.rng import ImageRNG

EXPECTED = {
    'uniform': {
        10: [
            14.6146412293, 7.83988287282, 4.60917413389, 2.91830711543, 1.95016147063, 1.34492778335,
            0.932357966835, 0.624976918012, 0.368657745415, 0.0291671581517, 0],
        30: [
            14.6146412293, 11.9175117415, 9.81415964353, 8.15844063822, 6.84304320286, 5.7885424442,
            4.93563655866, 4.23969774154, 3.66688546772, 3.19133291107, 2.79314234444, 2.45688133997,
            2.17051574771, 1.92458611031, 1.71161570127, 1.52565130355, 1.36192224798, 1.21657730692,
            1.0864823146, 0.969061830628, 0.862174412533, 0.764006307725, 0.672984480656, 0.587683114882,
            0.506723926374, 0.428618159202, 0.351466687147, 0.272182482449, 0.183450937575, 0.0291671581517,
            0],
    },
    'karras': {
        10: [
            14.6146412293, 9.10292813405, 5.47839198644, 3.16860307296, 1.74941704925, 0.914072265031,
            0.446918209373, 0.20139829978, 0.0819102383203, 0.0291671581517, 0],
        30: [
            14.6146412293, 12.660600973, 10.9349192387, 9.41490906969, 8.07972368918, 6.91024220546,
            5.8889601512, 4.99988475234, 4.22843482212, 3.56134517588, 2.98657546203, 2.49322330488,
            2.07144165461, 1.71236024024, 1.40801102079, 1.15125753041, 0.935728012906, 0.75575224117,
            0.606301917117, 0.482934547583, 0.381740691766, 0.299294475714, 0.232607269394, 0.179084421877,
            0.136484950152, 0.102884077124, 0.0766385142993, 0.0563543846985, 0.0408576815313,
            0.0291671581517, 0],
    },
    'exponential': {
        10: [
            14.6146412293, 7.32487017249, 3.67123093902, 1.84002395814, 0.922221517184, 0.462218180908,
            0.231664131427, 0.116110252705, 0.0581945539005, 0.0291671581517, 0],
        30: [
            14.6146412293, 11.7947397839, 9.51893956117, 7.68225599117, 6.19996132285, 5.00367606196,
            4.03821456769, 3.25903929286, 2.63020622961, 2.12270678215, 1.71312957603, 1.38258047176,
            1.11581096236, 0.900514746999, 0.726760030969, 0.586531363727, 0.473359879433, 0.382024882749,
            0.308313013799, 0.248823882344, 0.200813204937, 0.162066208827, 0.130795462638, 0.105558420664,
            0.0851908770248, 0.0687532598785, 0.0554872881816, 0.0447809915513, 0.0361404795592,
            0.0291671581517, 0],
    },
    'polyexponential': {
        10: [
            14.6146412293, 7.32487017249, 3.67123093902, 1.84002395814, 0.922221517184, 0.462218180908,
            0.231664131427, 0.116110252705, 0.0581945539005, 0.0291671581517, 0],
        30: [
            14.6146412293, 11.7947397839, 9.51893956117, 7.68225599117, 6.19996132285, 5.00367606196,
            4.03821456769, 3.25903929286, 2.63020622961, 2.12270678215, 1.71312957603, 1.38258047176,
            1.11581096236, 0.900514746999, 0.726760030969, 0.586531363727, 0.473359879433, 0.382024882749,
            0.308313013799, 0.248823882344, 0.200813204937, 0.162066208827, 0.130795462638, 0.105558420664,
            0.0851908770248, 0.0687532598785, 0.0554872881816, 0.0447809915513, 0.0361404795592,
            0.0291671581517, 0],
    },
    'sgm_uniform': {
        10: [
            14.6146412293, 8.30717217346, 5.09240759067, 3.32506914923, 2.27973029524, 1.61558026016,
            1.16286453409, 0.831883693374, 0.571188866649, 0.343704817509, 0],
        30: [
            14.6146412293, 11.996903269, 9.93908230068, 8.30717217346, 7.00185463478, 5.94889919097,
            5.09240759067, 4.38997243528, 3.80917865685, 3.32506914923, 2.91830711543, 2.57381033287,
            2.27973029524, 2.02670956754, 1.80731001677, 1.61558026016, 1.44673050401, 1.29688066174,
            1.16286453409, 1.04207794267, 0.932357966835, 0.831883693374, 0.739095801742, 0.652619841569,
            0.571188866649, 0.49355172032, 0.418326129752, 0.343704817509, 0.266689782905, 0.180125968003, 0],
    },
    'kl_optimal': {
        10: [
            14.6146412293, 4.56503666302, 2.63288785779, 1.78644528359, 1.29476728739, 0.96158802693,
            0.711626813124, 0.509419407138, 0.335637389052, 0.178346459172, 0.0291671581517],
        30: [
            14.6146412293, 8.47662739557, 5.94897128683, 4.56503666302, 3.68832784142, 3.08070206058,
            2.63288785779, 2.28769431199, 2.01228203134, 1.78644528359, 1.59706618309, 1.43525420219,
            1.29476728739, 1.17109118612, 1.06087761697, 0.96158802693, 0.871260176585, 0.788350792143,
            0.711626813124, 0.64008854014, 0.572914228685, 0.509419407138, 0.449026492787, 0.391241727577,
            0.335637389052, 0.281837846286, 0.229508441733, 0.178346459172, 0.128073629653, 0.0784297597991,
            0.0291671581517],
    },
    'align_your_steps': {
        10: [
            14.615, 6.11351366202, 3.56511373502, 2.39387348134, 1.64995551425, 1.13578731007,
            0.742518296322, 0.445007441579, 0.169205124189, 0.029, 0],
        30: [
            14.615, 11.0377844045, 8.33613989462, 6.36058433243, 5.32193344285, 4.45288893124,
            3.76663618023, 3.32830436042, 2.94098218823, 2.59903045209, 2.29745020176, 2.03086401905,
            1.80933978935, 1.63104614324, 1.47032168145, 1.3094294968, 1.15206112702, 1.01360542407,
            0.888346549776, 0.776561713026, 0.678843289581, 0.579118575987, 0.488905019044, 0.412744690912,
            0.30573912455, 0.219191480571, 0.15714346414, 0.090900729875, 0.0513431705914, 0.029, 0],
    },
    'simple': {
        10: [
            14.6146412293, 8.30280319105, 5.08776318268, 3.32108312985, 2.27646306576, 1.6128861943,
            1.16057832195, 0.829859528175, 0.56928488835, 0.341673832281, 0],
        30: [
            14.6146412293, 12.0177438689, 9.97203875335, 8.30280319105, 7.00887305084, 5.96313040467,
            5.08776318268, 4.39188444813, 3.81553525083, 3.32108312985, 2.91830711543, 2.57667208068,
            2.27646306576, 2.02600344025, 1.80853950212, 1.6128861943, 1.44577717321, 1.29730551312,
            1.16057832195, 1.04104319049, 0.932357966835, 0.829859528175, 0.738022694838, 0.652368601633,
            0.56928488835, 0.49240921469, 0.4178792223, 0.341673832281, 0.265252412952, 0.179258684728, 0],
    },
    'normal': {
        10: [
            14.6146412293, 7.83988287282, 4.60917413389, 2.91830711543, 1.95016147063, 1.34492778335,
            0.932357966835, 0.624976918012, 0.368657745415, 0.0291671581517, 0],
        30: [
            14.6146412293, 11.9175117415, 9.81415964353, 8.15844063822, 6.84304320286, 5.7885424442,
            4.93563655866, 4.23969774154, 3.66688546772, 3.19133291107, 2.79314234444, 2.45688133997,
            2.17051574771, 1.92458611031, 1.71161570127, 1.52565130355, 1.36192224798, 1.21657730692,
            1.0864823146, 0.969061830628, 0.862174412533, 0.764006307725, 0.672984480656, 0.587683114882,
            0.506723926374, 0.428618159202, 0.351466687147, 0.272182482449, 0.183450937575, 0.0291671581517,
            0],
    },
    'ddim': {
        10: [
            8.39068477022, 5.13443111752, 3.34776358066, 2.29285382179, 1.62369208152, 1.16821595505,
            0.835652808033, 0.574050259463, 0.346186706381, 0.0413144119968, 0],
        30: [
            13.9258487496, 11.4768464583, 9.54358256673, 8.00431065254, 6.76838263456, 5.76777230239,
            4.95103978048, 4.27900002013, 3.72159016679, 3.25558683812, 2.86293042457, 2.52948610898,
            2.24412132998, 1.99801413702, 1.78413114832, 1.59683088637, 1.43156033743, 1.28462116482,
            1.15298812644, 1.03416660085, 0.92607917323, 0.826973242986, 0.735342670605, 0.64985638891,
            0.56928488835, 0.49240921469, 0.4178792223, 0.343931226449, 0.267652354123, 0.182165982094,
            0.0413144119968, 0],
    },
    'beta': {
        10: [
            14.6146412293, 13.9277847455, 12.4909802022, 10.5976078178, 8.44243669368, 6.20137169381,
            4.04620056965, 2.15282818524, 0.716023641978, 0.0291671581517, 0],
        30: [
            14.6146412293, 14.5159214039, 14.3023819704, 14.0040804994, 13.634924567, 13.2046574071,
            12.721147169, 12.1912436472, 11.621184432, 11.0168154002, 10.3837217269, 9.72731108921,
            9.05286946664, 8.36560050975, 7.67065486886, 6.97315351862, 6.27820787774, 5.59093892085,
            4.91649729828, 4.26008666057, 3.6269929873, 3.02262395551, 2.45256474025, 1.9226612185,
            1.43915098035, 1.00888382045, 0.639727888036, 0.341426417077, 0.127886983618, 0.0291671581517, 0],
    },
}


@pytest.fixture(scope="module")
def sd1() -> sd_schedulers.ModelSigmas:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return sd_schedulers.ModelSigmas(torch.cumprod(1 - betas, 0))


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("steps", [10, 30])
def test_sigmas_equal_automatic1111s(sd1, name, steps):
    expected = EXPECTED[name][steps]
    if name == "ddim" and steps == 30:
        # A1111 walks range(1, 1000, 1000 // 30): 31 steps; the project's DDIM (sampler and schedule) takes
        # exactly 30, the timesteps 1 + 33 i for i < 30: A1111's list without its first (highest) sigma.
        assert len(expected) == 32
        expected = expected[1:]
    ours = sd_schedulers.get_sigmas(name, steps, sd1)
    assert len(ours) == steps + 1
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)
    if name != "kl_optimal":  # KL Optimal ends at sigma_min, as in A1111
        assert ours[-1] == 0
    assert all(a > b for a, b in zip(ours, ours[1:]))


def test_align_your_steps_takes_the_sdxl_table_for_sdxl(sd1):
    sdxl = sd_schedulers.get_sigmas("align_your_steps", 10, sd1, is_sdxl=True)
    assert sdxl[0] == pytest.approx(14.615) and sdxl[-2:] == pytest.approx([0.029, 0.0])
    assert sdxl != sd_schedulers.get_sigmas("align_your_steps", 10, sd1)
    # 11 steps is the table itself; other counts interpolate in log sigma
    assert sd_schedulers.get_sigmas("align_your_steps", 11, sd1, is_sdxl=True) == pytest.approx(
        [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029, 0.0])
    assert sd_schedulers.get_sigmas("align_your_steps", 11, sd1)[:3] == pytest.approx([14.615, 6.475, 3.861])


def test_the_list_is_a1111s():
    rows = [(s.name, s.label, s.aliases, s.default_rho, s.need_inner_model) for s in sd_schedulers.all_schedulers]
    assert rows == [
        ("automatic", "Automatic", (), -1, False), ("uniform", "Uniform", (), -1, True),
        ("karras", "Karras", (), 7.0, False), ("exponential", "Exponential", (), -1, False),
        ("polyexponential", "Polyexponential", (), 1.0, False),
        ("sgm_uniform", "SGM Uniform", ("SGMUniform",), -1, True), ("kl_optimal", "KL Optimal", (), -1, False),
        ("align_your_steps", "Align Your Steps", (), -1, False), ("simple", "Simple", (), -1, True),
        ("normal", "Normal", (), -1, True), ("ddim", "DDIM", (), -1, True), ("beta", "Beta", (), -1, True)]
    assert sd_samplers.all_schedulers is sd_schedulers.all_schedulers
    assert sd_samplers.find_scheduler is sd_schedulers.find_scheduler


@pytest.mark.parametrize("given,label", [("Align Your Steps", "Align Your Steps"), ("align_your_steps", "Align Your Steps"),
                                         ("ALIGN YOUR STEPS", "Align Your Steps"), ("sgmuniform", "SGM Uniform"),
                                         ("SGMUniform", "SGM Uniform"), ("sgm_uniform", "SGM Uniform"),
                                         ("kl optimal", "KL Optimal"), ("KL_OPTIMAL", "KL Optimal"),
                                         ("beta", "Beta"), (" Polyexponential ", "Polyexponential"),
                                         ("", "Automatic"), (None, "Automatic"), ("ddim", "DDIM")])
def test_lookup_by_label_name_or_alias_in_any_case(given, label):
    assert sd_schedulers.find_scheduler(given).label == label


def test_unknown_schedule_type_names_what_exists():
    with pytest.raises(InvalidParameter) as err:
        sd_schedulers.find_scheduler("Cosine")
    assert err.value.field == "scheduler"
    assert all(s.label in str(err.value) for s in sd_schedulers.all_schedulers)


def test_discard_next_to_last_sigma(sd1):
    full = sd_schedulers.get_sigmas("karras", 11, sd1)
    assert sd_schedulers.get_sigmas("karras", 10, sd1, discard_next_to_last_sigma=True) == full[:-2] + full[-1:]
    assert len(full[:-2] + full[-1:]) == 11


class Recording:
    def __init__(self):
        self.alphas, self.timesteps = [], []

    def __call__(self, x, timestep, alpha, step):
        from modules.sd_samplers_cfg_denoiser import DenoiserOutput

        self.alphas.append(float(alpha))
        self.timesteps.append(float(timestep))
        return DenoiserOutput(x * 0, x * 0, x * 0, {}, {})


def test_create_sampler_discards_the_next_to_last_sigma(tiny_model):
    inner = sd_schedulers.ModelSigmas(tiny_model.alphas_cumprod)
    for name, schedule in [("Euler", "Karras"), ("DPM++ 2M", "Automatic"), ("Euler a", "Uniform"), ("LCM", "Beta")]:
        sampler = sd_samplers.create_sampler(name, tiny_model, scheduler=schedule, discard_next_to_last_sigma=True)
        if name != "LCM":
            kind = "karras" if schedule in ("Karras", "Automatic") else schedule.lower()
            full = sd_schedulers.get_sigmas(kind, 7, inner)
            assert sampler.sigmas(6) == pytest.approx(full[:-2] + full[-1:])
        den, rng = Recording(), ImageRNG((4, 8, 8), [1])
        seen = []
        sampler.sample(den, rng.first(), 6, rng, [seen.append])
        assert len(seen) == 6
        used = [((1 - a) / a) ** 0.5 for a in den.alphas]
        assert used == pytest.approx(sampler.sigmas(6)[:-1], rel=1e-6)
    # DPM++ 3M SDE discards by default (A1111's option), and DDIM discards its lowest timestep on request
    assert sd_samplers.create_sampler("DPM++ 3M SDE", tiny_model).discard
    den, rng = Recording(), ImageRNG((4, 8, 8), [1])
    sd_samplers.create_sampler("DDIM", tiny_model, discard_next_to_last_sigma=True).sample(den, rng.first(), 6, rng, [])
    assert den.timesteps == [i * (1000 // 7) + 1 for i in range(1, 7)][::-1]
    for name in ("PLMS", "UniPC"):
        with pytest.raises(InvalidParameter) as err:
            sd_samplers.create_sampler(name, tiny_model, discard_next_to_last_sigma=True)
        assert err.value.field == "discard_next_to_last_sigma"


def test_lcm_schedules_use_lcm_s_own_timesteps(tiny_model):
    lcm = sd_schedulers.LCMSigmas(tiny_model.alphas_cumprod)
    sigmas = ((1 - tiny_model.alphas_cumprod.double()) / tiny_model.alphas_cumprod.double()).sqrt()
    assert lcm.sigma_min == pytest.approx(float(sigmas[19])) and lcm.sigma_max == pytest.approx(float(sigmas[999]))
    uniform = sd_schedulers.get_sigmas("uniform", 4, lcm)
    assert uniform[0] == pytest.approx(float(sigmas[999])) and uniform[3] == pytest.approx(float(sigmas[19]))
    assert [lcm.model_timestep(s) for s in uniform[:-1]] == [999.0, 679.0, 339.0, 19.0]  # nearest of 19 + 20 k


def test_every_sampler_that_takes_schedule_types_takes_all_but_unipc():
    full = {s.name for s in sd_schedulers.all_schedulers} - {"automatic"}
    for data in sd_samplers.all_samplers:
        if data.name in ("DDIM", "DDIM CFG++", "PLMS", "DPM fast", "DPM adaptive"):
            assert data.schedule_types == ()
        elif data.name == "UniPC":
            assert set(data.schedule_types) == {"uniform", "karras", "exponential", "sgm_uniform"}
        else:
            assert set(data.schedule_types) == full, data.name
    with pytest.raises(InvalidParameter) as err:
        sd_samplers.get_sampler_and_scheduler("UniPC", "Beta")
    assert "Karras" in str(err.value) and err.value.field == "scheduler"
