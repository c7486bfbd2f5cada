"""Phrase tables for the synthetic letters in `demo.py`: body regions, treatment families, citations.

All sentences here were written for this project (generic clinical wording); none is taken from a
real letter. Citation strings follow the public guideline names (MTUS, ODG, ACOEM) the letters cite.
Templates use `{part}` (e.g. "right shoulder" / "lumbar spine"), `{Side}`, `{site}`, `{level}` (spine
only), `{limbs}`, and the guideline chapter names `{mtus}`, `{odg}`, `{acoem}`, `{post}`, `{OUT}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imr_model.types import OVERTURNED, UPHELD


@dataclass(frozen=True)
class Region:
    key: str
    site: str
    sided: bool
    mtus: str  # MTUS chapter cited as "MTUS <mtus>"
    odg: str
    acoem: str
    post: str  # MTUS Postsurgical Treatment section
    limbs: str
    level: str  # spine level for injections/surgery; "" for joints
    dx: tuple[str, ...]
    exam: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    key: str
    p_over: float
    requests: tuple[str, ...]
    cites: tuple[str, ...]
    guide: tuple[str, ...]
    pos: tuple[str, ...]  # clauses supporting necessity ("the prior course produced ...")
    neg: tuple[str, ...]
    hist_pos: tuple[str, ...] = ()
    hist_neg: tuple[str, ...] = ()
    region_requests: dict[str, tuple[str, ...]] = field(default_factory=dict)


_UE, _LE = "upper extremities", "lower extremities"
REGIONS = {
    r.key: r
    for r in (
        Region("neck", "cervical spine", False, "Neck and Upper Back Complaints 2004", "Neck and Upper Back",
               "Cervical and Thoracic Spine Disorders", "Neck and Upper Back", _UE, "C5-C6",
               ("cervical strain", "cervical radiculopathy", "cervical disc protrusion"),
               ("tenderness of the cervical paraspinal muscles", "reduced cervical rotation",
                "decreased sensation in the C6 dermatome")),
        Region("shoulder", "shoulder", True, "Shoulder Complaints 2004", "Shoulder", "Shoulder Disorders", "Shoulder",
               _UE, "", ("{side} shoulder impingement", "{side} rotator cuff tendinitis", "{side} shoulder strain"),
               ("a positive impingement sign on the {side}",
                "forward flexion of the {side} shoulder limited to 120 degrees")),
        Region("elbow", "elbow", True, "Elbow Complaints 2007", "Elbow", "Elbow Disorders", "Elbow", _UE, "",
               ("{side} lateral epicondylitis", "{side} elbow sprain"),
               ("tenderness over the {side} lateral epicondyle", "pain with resisted wrist extension")),
        Region("wrist", "wrist", True, "Forearm, Wrist, and Hand Complaints 2004", "Forearm, Wrist & Hand",
               "Hand, Wrist, and Forearm Disorders", "Carpal tunnel syndrome", _UE, "",
               ("{side} carpal tunnel syndrome", "{side} wrist tendinitis"),
               ("a positive Phalen test on the {side}", "reduced grip strength on the {side}")),
        Region("low_back", "lumbar spine", False, "Low Back Complaints 2004", "Low Back", "Low Back Disorders",
               "Low Back", _LE, "L4-L5",
               ("lumbar strain", "lumbar radiculopathy", "lumbar degenerative disc disease"),
               ("lumbar paraspinal spasm", "a positive straight leg raise on the {side}", "limited lumbar flexion")),
        Region("knee", "knee", True, "Knee Complaints 2004", "Knee & Leg", "Knee Disorders", "Knee", _LE, "",
               ("{side} knee medial meniscus tear", "{side} knee sprain", "{side} knee osteoarthritis"),
               ("medial joint line tenderness of the {side} knee", "a mild effusion of the {side} knee")),
        Region("ankle", "ankle", True, "Ankle and Foot Complaints 2004", "Ankle & Foot", "Ankle and Foot Disorders",
               "Ankle & foot", _LE, "", ("{side} ankle sprain", "{side} plantar fasciitis"),
               ("swelling of the {side} lateral ankle", "tenderness at the {side} plantar fascia insertion")),
        Region("psych", "psyche", False, "Stress Related Conditions Complaints 2004", "Mental Illness & Stress",
               "Chronic Pain", "", "", "", ("adjustment disorder with anxiety",), ("an anxious affect",)),
    )
}  # fmt: skip

_CPMT = "Decision based on MTUS Chronic Pain Medical Treatment 2016, Section(s): {}."
_ODG = "{{OUT}} Decision based on Non-MTUS Citation Official Disability Guidelines (ODG) {{odg}} Chapter, {}."
_NON = "{{OUT}} Decision based on Non-MTUS Citation {}."
_ACOEM = "{OUT} Decision based on Non-MTUS Citation ACOEM Occupational Medicine Practice Guidelines, 3rd ed., {acoem}."


def _f(**kw) -> Family:
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    kw.setdefault("hist_pos", kw["pos"])
    kw.setdefault("hist_neg", kw["neg"])
    return Family(**kw)


FAMILIES = {f.key: f for f in (
    _f(key="imaging", p_over=0.10,
       requests=["MRI of the {part} without contrast", "MRI of the {part}", "X-rays of the {part}, 3 views",
                 "CT scan of the {part}", "EMG/NCV of the bilateral {limbs}"],
       cites=["Decision based on MTUS {mtus}, Section(s): Special Studies.",
              _ODG.format("MRIs (magnetic resonance imaging)"), _ACOEM,
              "Decision based on MTUS {mtus}, Section(s): Special Studies. Decision based on Non-MTUS Citation "
              "Official Disability Guidelines (ODG) {odg} Chapter, Radiography."],
       guide=["The MTUS guidelines support imaging of the {site} when there are red flag findings, a progressive "
              "neurologic deficit, or when surgery is being considered for a clearly identified lesion.",
              "The guidelines advise against routine imaging without physiologic evidence of tissue insult or nerve "
              "dysfunction.",
              "Repeat imaging is reserved for a significant change in symptoms or findings that suggest new "
              "pathology."],
       pos=["the examination documents progressive weakness and a new dermatomal sensory deficit",
            "the treating surgeon has stated that the results will guide a planned procedure",
            "symptoms have persisted despite more than six weeks of conservative care with objective instability",
            "there is concern for an occult fracture after a recent fall"],
       neg=["the neurologic examination is unchanged and no red flag findings are described",
            "a study of the same region was completed within the past year and no new injury is described",
            "there is no discussion of how the study would change the treatment plan",
            "a trial of conservative care has not yet been completed"]),
    _f(key="pt", p_over=0.14,
       requests=["Physical therapy 2 times a week for 6 weeks for the {part}",
                 "Additional physical therapy x8 sessions for the {part}",
                 "Physical therapy 3 times a week for 4 weeks for the {part} (IMR eligible portion: 6 sessions of "
                 "physical therapy for the {part} as modified by utilization review)", "Aquatic therapy x12 sessions"],
       cites=[_CPMT.format("Physical medicine treatment"), _CPMT.format("Aquatic therapy"),
              "Decision based on MTUS General Approaches 2004, Section(s): Initial Approaches to Treatment.",
              _ODG.format("Physical therapy (PT)")],
       guide=["The MTUS guidelines allow for fading of treatment frequency plus active self-directed home exercise.",
              "For myalgia and neuritis, the guidelines allow 8 to 10 visits over 4 weeks.",
              "Further therapy depends on objective functional improvement from the sessions already completed."],
       pos=["a new flare with measurable loss of motion is documented and no therapy has been given for this region "
            "in over a year",
            "the prior course produced objective gains in grip strength and walking tolerance",
            "the number of visits requested is within the number the guidelines allow for this condition"],
       neg=["at least 24 sessions have been completed without documented objective functional improvement",
            "there is no explanation of why a home exercise program cannot be continued",
            "the requested number of sessions exceeds the number the guidelines allow"]),
    _f(key="chiro", p_over=0.10,
       requests=["Chiropractic treatment 2 times a week for 4 weeks for the {part}",
                 "Chiropractic manipulation x6 visits"],
       cites=[_CPMT.format("Manual therapy & manipulation"), _ODG.format("Manipulation")],
       guide=["The MTUS guidelines recommend manual therapy for chronic musculoskeletal pain, beginning with a "
              "trial of 6 visits over 2 weeks.",
              "With objective functional improvement, up to 18 visits over 6 to 8 weeks may be considered.",
              "Elective or maintenance care is not supported by the guidelines."],
       pos=["this is an initial trial and no manipulation has been given before",
            "the initial six visits produced a documented gain in range of motion and a return to modified work"],
       neg=["chiropractic care has continued for several months and the request amounts to maintenance care",
            "no objective functional improvement from the prior visits is documented"]),
    _f(key="acupuncture", p_over=0.15,
       requests=["Acupuncture 2 times a week for 3 weeks for the {part}",
                 "Additional acupuncture x6 sessions for the {part}"],
       cites=["Decision based on MTUS Acupuncture Treatment 2007.", _ODG.format("Acupuncture")],
       guide=["The MTUS acupuncture guidelines support acupuncture when pain medication is reduced or not tolerated, "
              "or as an adjunct to physical rehabilitation.",
              "Functional improvement is expected within 3 to 6 treatments, and treatment may be extended when it "
              "is documented."],
       pos=["the first six treatments allowed a reduction in oral medication and longer sitting tolerance",
            "oral medications are poorly tolerated and acupuncture has not been tried before"],
       neg=["more than 20 acupuncture sessions have been completed without a documented change in function",
            "the request does not state how acupuncture fits into an active rehabilitation program"]),
    _f(key="opioid", p_over=0.12,
       requests=["Norco 10/325mg #90", "Tramadol ER 150mg #30", "Oxycodone 10mg #60", "Tapentadol 50mg #60",
                 "Hydrocodone/APAP 7.5/325mg #120"],
       cites=[_CPMT.format("Opioids, criteria for use"), _CPMT.format("Opioids for chronic pain"),
              "Decision based on MTUS Opioid Treatment 2016, Section(s): Long-term Opioid Therapy.",
              _NON.format("UpToDate, Use of opioids in the management of chronic non-cancer pain")],
       guide=["The MTUS guidelines call for ongoing review of pain relief, function, appropriate use and side effects "
              "during long-term opioid therapy.",
              "Continued use is supported when the injured worker has returned to work or shows improved function "
              "and pain.",
              "The guidelines suggest keeping the daily dose below 120 mg oral morphine equivalents."],
       pos=["a signed opioid agreement is on file and recent urine drug screens matched the prescribed medications",
            "pain decreased from 8 out of 10 to 4 out of 10 with the medication and modified work continues",
            "the medication is prescribed for a limited period after surgery"],
       neg=["no objective functional improvement with long-term use is documented",
            "the most recent urine drug screen was inconsistent and this was not addressed",
            "opioids have been used for several years without any change in pain scores"]),
    _f(key="nsaid", p_over=0.10,
       requests=["Naproxen sodium 550mg #60", "Meloxicam 15mg #30", "Ibuprofen 800mg #90", "Omeprazole 20mg #60",
                 "Pantoprazole 20mg #30"],
       cites=[_CPMT.format("NSAIDs (non-steroidal anti-inflammatory drugs)"),
              _CPMT.format("NSAIDs, GI symptoms & cardiovascular risk"), _CPMT.format("Anti-inflammatory medications")],
       guide=["The MTUS guidelines recommend NSAIDs at the lowest dose for the shortest period in moderate to "
              "severe pain.",
              "A proton pump inhibitor is indicated for patients taking NSAIDs who are at intermediate or high risk "
              "for gastrointestinal events."],
       pos=["the medication improves sleep and activity tolerance according to the treating physician",
            "there is a history of gastrointestinal bleeding and the injured worker is over 65 years of age"],
       neg=["no gastrointestinal risk factors are documented",
            "the medication has been used for over a year without a documented functional benefit"]),
    _f(key="topical", p_over=0.04,
       requests=["Compounded cream: Flurbiprofen 20%/Lidocaine 5% 180gm", "Lidoderm 5% patches #30",
                 "Compounded topical: Gabapentin 10%/Cyclobenzaprine 2%/Capsaicin 0.025% 240gm",
                 "Diclofenac 1% gel 100gm"],
       cites=[_CPMT.format("Topical Analgesics"), _CPMT.format("Lidoderm (lidocaine patch)"),
              _NON.format("FDA prescribing information, diclofenac sodium topical gel")],
       guide=["The MTUS guidelines describe topical analgesics as largely experimental, with few randomized trials "
              "of efficacy or safety.",
              "Any compounded product that contains at least one drug or drug class that is not recommended is not "
              "recommended."],
       pos=["first-line oral agents have failed and the pain is localized and neuropathic",
            "oral NSAIDs cannot be tolerated because of gastritis"],
       neg=["the compound contains an ingredient the guidelines do not support in topical form",
            "no trial of a first-line antidepressant or anticonvulsant is documented"]),
    _f(key="relaxant", p_over=0.05,
       requests=["Cyclobenzaprine 7.5mg #60", "Tizanidine 4mg #90", "Carisoprodol 350mg #60",
                 "Methocarbamol 750mg #60"],
       cites=[_CPMT.format("Muscle relaxants (for pain)"), _CPMT.format("Cyclobenzaprine (Flexeril)"),
              _CPMT.format("Carisoprodol (Soma)"), _CPMT.format("Antispasticity/Antispasmodic drugs")],
       guide=["The MTUS guidelines advise non-sedating muscle relaxants with caution as a second-line option for "
              "short-term treatment of acute exacerbations of chronic back pain.",
              "Efficacy appears to diminish over time, and prolonged use may lead to dependence."],
       pos=["an acute exacerbation with palpable spasm is documented and a short course is requested",
            "this is the first muscle relaxant prescription after a new flare"],
       neg=["the medication has been prescribed continuously for several months",
            "no muscle spasm is documented on the recent examinations"]),
    _f(key="tens", p_over=0.08,
       requests=["TENS unit purchase", "TENS unit rental for 30 days", "Interferential stimulator unit and supplies",
                 "Durable medical equipment: TENS unit electrodes and batteries for 3 months"],
       cites=[_CPMT.format("TENS, chronic pain (transcutaneous electrical nerve stimulation)"),
              _CPMT.format("Interferential Current Stimulation (ICS)"), _ODG.format("TENS (transcutaneous "
                           "electrical nerve stimulation)")],
       guide=["The MTUS guidelines do not recommend TENS as a primary treatment modality, but a one-month home trial "
              "may be considered as an adjunct to evidence-based functional restoration.",
              "Purchase requires documentation of use during the trial and its effect on pain and function."],
       pos=["a one-month trial documented daily use with lower medication intake and better sitting tolerance",
            "the unit will be an adjunct to an active functional restoration program"],
       neg=["no successful one-month trial is documented", "the request is for purchase without a prior rental trial",
            "there is no evidence that other appropriate pain modalities were tried and failed"]),
    _f(key="injection", p_over=0.14,
       requests=["Epidural steroid injection at {level}", "Bilateral medial branch blocks at {level}",
                 "Corticosteroid injection to the {part}", "Trigger point injections x4 to the {site} region"],
       cites=[_CPMT.format("Epidural steroid injections (ESIs)"), "Decision based on MTUS {mtus}, Section(s): "
                           "Initial Care.",
              _ODG.format("Facet joint diagnostic blocks (injections)"), _CPMT.format("Trigger point injections")],
       guide=["The MTUS guidelines accept epidural injections as an option for radicular pain with corroborating "
              "findings of radiculopathy.",
              "Repeat blocks depend on at least 50% pain relief with functional improvement for six to eight weeks.",
              "Injections have limited proven value but may be an option when conservative care has not helped."],
       pos=["the examination shows dermatomal sensory loss that is corroborated by imaging",
            "the prior injection gave more than 50% relief for eight weeks with less medication use"],
       neg=["no radicular findings are documented and imaging shows no nerve root compromise",
            "the previous injection gave only two weeks of partial relief"]),
    _f(key="surgery", p_over=0.16,
       requests=["Arthroscopic debridement of the {part}"],
       region_requests={
           "neck": ("C5-C6 anterior cervical discectomy and fusion",),
           "shoulder": ("{Side} shoulder arthroscopy with subacromial decompression",
           "{Side} shoulder rotator cuff repair"),
           "elbow": ("{Side} lateral epicondyle release",),
           "wrist": ("{Side} carpal tunnel release",),
           "low_back": ("L4-L5 microdiscectomy", "L4-L5 posterior lumbar interbody fusion with 2 day inpatient stay"),
           "knee": ("{Side} knee arthroscopy with partial medial meniscectomy",),
           "ankle": ("{Side} ankle arthroscopy with debridement",),
       },
       cites=["Decision based on MTUS {mtus}, Section(s): Surgical Considerations.",
              _ODG.format("Indications for Surgery"),
              _ACOEM, _NON.format("Journal of Orthopaedic Surgery, outcomes of elective procedures after workplace "
                                  "injury")],
       guide=["The MTUS guidelines support surgical referral when activity limitation persists beyond three months, "
              "exercise programs have failed, and imaging shows a lesion that benefits from repair.",
              "Surgery is not advised when imaging findings do not match the clinical presentation."],
       pos=["imaging confirms a lesion that matches the examination and more than six months of conservative care "
            "have failed",
            "weakness is progressing and a matching lesion is seen on imaging"],
       neg=["the imaging findings do not match the reported symptoms",
            "there is no documentation that a full course of conservative care was attempted"]),
    _f(key="dme", p_over=0.07,
       requests=["Purchase of a {part} brace", "Hot and cold therapy pack for the {part}",
                 "Durable medical equipment: home exercise kit", "Purchase of a seat cushion and lumbar roll"],
       cites=[_ODG.format("Durable medical equipment (DME)"), "Decision based on MTUS {mtus}, Section(s): Physical "
                          "Methods.",
              "{OUT} Decision based on Non-MTUS Citation Official Disability Guidelines (ODG) Low Back Chapter, "
              "Lumbar supports."],
       guide=["The guidelines accept durable medical equipment that primarily serves a medical purpose and is "
              "suitable for home use.",
              "Bracing has not shown lasting benefit beyond the acute phase of symptom relief."],
       pos=["instability is documented on examination and the device is part of the rehabilitation plan",
            "the treating physician explains how the device will allow a return to regular activity"],
       neg=["the injury is chronic and no instability is documented",
            "the device mainly serves convenience rather than a medical purpose"]),
    _f(key="psych", p_over=0.15,
       requests=["Cognitive behavioral therapy x6 sessions", "Psychological evaluation",
                 "Functional restoration program x80 hours",
                 "Sertraline 50mg #30", "Zolpidem 10mg #30", "Biofeedback x6 sessions"],
       cites=["Decision based on MTUS {mtus}, Section(s): Initial Approaches to Treatment.",
              _CPMT.format("Behavioral interventions"), _CPMT.format("Functional restoration programs (FRPs)"),
              _ODG.format("Cognitive therapy for depression"), _NON.format("UpToDate, Treatment of insomnia in "
                          "adults")],
       guide=["The MTUS guidelines support behavioral interventions for chronic pain, starting with an initial "
              "trial of 3 to 4 visits.",
              "Hypnotics are intended for short-term use, generally two to six weeks."],
       pos=["depressive symptoms scores improved after the initial visits and coping skills are being applied at work",
            "a psychological evaluation identified fear-avoidance behavior that limits rehabilitation"],
       neg=["the number of sessions already completed exceeds the initial trial without documented improvement",
            "the hypnotic has been used nightly for more than a year"]),
)}  # fmt: skip

ASSOCIATED = {f.key: f for f in (
    _f(key="assoc_cold", p_over=0.0, requests=["Associated surgical service: Cold therapy unit for 7 days"],
       cites=[_ODG.format("Continuous-flow cryotherapy")],
       guide=["The guidelines accept continuous-flow cryotherapy for up to seven days after surgery."],
       pos=["the request is limited to seven days after the procedure"], neg=["the rental period requested is "
            "open-ended"]),
    _f(key="assoc_preop",
           p_over=0.0, requests=["Associated surgical service: Pre-operative medical clearance and labs"],
       cites=["{OUT} Decision based on Non-MTUS Citation Official Disability Guidelines (ODG) Low Back Chapter, "
              "Preoperative testing, general."],
       guide=["Preoperative testing should be guided by the patient's clinical history, comorbidities and physical "
              "findings."],
       pos=["the injured worker has diabetes and hypertension that warrant preoperative evaluation"],
       neg=["no comorbid condition that would call for testing is documented"]),
    _f(key="assoc_assistant", p_over=0.0, requests=["Associated surgical service: Assistant surgeon"],
       cites=[_NON.format("American College of Surgeons, Physicians as Assistants at Surgery")],
       guide=["Published surgical society lists identify the procedures for which an assistant surgeon is usually "
              "needed."],
       pos=["the planned procedure is listed as one that usually needs an assistant"],
       neg=["the planned procedure is not one that usually needs an assistant"]),
    _f(key="assoc_postop_pt",
           p_over=0.0, requests=["Post-operative physical therapy 2 times a week for 6 weeks for the {part}"],
       cites=["Decision based on MTUS Postsurgical Treatment 2009, Section(s): {post}."],
       guide=["The MTUS postsurgical guidelines allow an initial course of therapy of half the general course after "
              "surgery."],
       pos=["the number of visits requested fits the initial postsurgical course"],
       neg=["the number of visits requested exceeds the initial postsurgical course"]),
)}  # fmt: skip

FAMILY_WEIGHTS = {"imaging": 12, "pt": 10, "chiro": 4, "acupuncture": 5, "opioid": 12, "nsaid": 9, "topical": 7,
                  "relaxant": 7, "tens": 4, "injection": 7, "surgery": 6, "dme": 5, "psych": 6}  # fmt: skip

SOFT_VERDICTS = {
    UPHELD: ("The request is not supported by the guidelines at this time.",
             "The guideline criteria for this request have not been met.",
             "This treatment is not appropriate for the injured worker at this time."),
    OVERTURNED: ("The request is supported by the guidelines in this case.",
                 "The guideline criteria for this request have been met.",
                 "This treatment is appropriate for the injured worker at this time."),
}  # fmt: skip

MECHANISMS = ("lifting a heavy box", "slipping on a wet floor", "performing repetitive keyboard work",
              "driving for work when another vehicle struck the car", "pulling a loaded pallet jack",
              "climbing down from a delivery truck", "restraining a patient")  # fmt: skip
PRIOR_CARE = ["medications", "physical therapy", "chiropractic care", "acupuncture", "a home exercise program",
              "activity modification", "injections", "diagnostic imaging"]  # fmt: skip
SPECIALTIES = ("Family Practice", "Internal Medicine", "Physical Medicine & Rehabilitation", "Orthopedic Surgery",
               "Preventive Medicine, Occupational Medicine", "Anesthesiology, Pain Management",
               "Psychology")  # fmt: skip
LICENSURES = ("California", "California, Texas", "Washington", "New York", "Florida, California")
BOILERPLATE = (
    "MAXIMUS Federal Services sent the complete case file to an expert reviewer. In this synthetic demo "
    "letter this paragraph stands in for the standard statement of the reviewer's independence, active "
    "clinical practice, and familiarity with the governing guidelines and the strength of evidence hierarchy."
)
SUMMARY_LEAD = (
    "The expert reviewer developed the following clinical case summary based on a review of the case file, "
    "including all medical records:"
)
